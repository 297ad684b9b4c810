"""nnU-Net v2, configured as the FLARE22 winner configured theirs, side by side with our
pipeline on the same 512 x 512 x N cases and the same cores (issue 18).

Contenders, each case run by each in its own fresh subprocess (so peak RSS is that process's
own), interleaved case by case and in a rotating order so that a load change on a shared
machine hits all of them alike:

- ``nnunet``, ``nnunet-mirror``: nnU-Net v2's 3D full-resolution PlainConvUNet with the
  winner's plans (below), random weights, run by nnU-Net's own ``nnUNetPredictor``
  (``manual_initialization`` with plans and configuration built in code, then the steps of
  its ``predict_single_npy_array``: preprocessing with resampling to the target spacing,
  sliding-window logits, resampling back to the input's grid, argmax), without and with
  mirroring (all 3 axes, 8 passes per tile). Needs the ``peers`` extra in its own
  environment: ``make peers-setup`` (``.venv-peers``).
- ``ours-tiny``, ``ours-paper``: the appliance (``app.predict``, ONNX Runtime CPU provider,
  fp32, the bundle's default mode) on a tiny and a paper-size random-weight bundle
  (``flare22 export --random``; given bundles are used as they are).

Per case and contender: seconds from reading the CT to the written label file (interpreter
start and model loading excluded, both reported), the stages, peak RSS, and our time /
nnU-Net's time, case by case in the same run. Threads: ``--threads`` (1 or 2) for every
contender: torch intra-op threads and nnU-Net's worker count for nnU-Net, ONNX Runtime's
intra-op threads for ours, OMP / MKL thread variables for both.

    make peers-setup        # once: .venv-peers with torch (the same build) + nnunetv2==2.8.1
    flock /work/heavy.lock .venv/bin/python bench/peers.py --slices 200 --cases 1 --threads 2 \\
        --json bench/out/peers/peers.json

The winner's configuration (team blackbean, Huang et al., "Revisiting nnU-Net for iterative
pseudo labeling and efficient sliding window inference", FLARE22; public repository
Ziyan-Huang/FLARE22 at commit 6bad1ed): see ``WINNER`` and its ``SOURCES``, and
docs/results.md ("Peers (issue 18)") for what could not be carried over.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from app.argtypes import OneLineParser, nonneg_int, positive_float, positive_int  # noqa: E402

NUM_CLASSES = 14  # background + the 13 FLARE22 organs

# The winner's small nnU-Net (the model they submitted), axis order (z, y, x).
WINNER = {
    "target_spacing": (4.0, 1.2, 1.2),
    "patch_size": (32, 128, 192),
    "features_per_stage": (16, 32, 64, 128, 256),
    "kernel_sizes": ((1, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3)),
    "strides": ((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2)),
    "n_conv_per_stage": 2,
    "tile_step_size": 0.5,
    "mirroring": False,
    "data_resampling": "trilinear",
    "seg_resampling": "nearest",
}
_REPO = "Ziyan-Huang/FLARE22@6bad1ed"
_PLANNER = f"{_REPO}:nnunet/experiment_planning/experiment_planner_FLARE22Small.py"
_TRAINER = f"{_REPO}:nnunet/training/network_training/nnUNetTrainerV2_FLARE.py"
_DEBUG = (f"{_REPO}:RESULTS_FOLDER/nnUNet/3d_fullres/Task026_FLARE22_all_ite3_selected/"
          "nnUNetTrainerV2_FLARE_Small__nnUNetPlansFLARE22Small/all/debug.json")
SOURCES = {
    "target_spacing": f"{_PLANNER} line 40 (get_target_spacing: 4.0, 1.2, 1.2 mm)",
    "patch_size": f"{_PLANNER} line 129; {_DEBUG} line 62 (the trained model: [32 128 192])",
    "features_per_stage": f"{_TRAINER} lines 47-49 (stage_num 5, base 16, max 256; doubling per stage)",
    "kernel_sizes": f"{_PLANNER} line 127, cut to 5 stages by {_TRAINER} line 58; {_DEBUG} line 44",
    "strides": f"{_PLANNER} line 128, cut to 4 poolings by {_TRAINER} line 59; {_DEBUG} line 45",
    "n_conv_per_stage": f"{_TRAINER} line 46; {_DEBUG} line 16",
    "tile_step_size": f"{_REPO}:nnunet/inference/predict_simple.py line 108 (default 0.5; predict.sh does not set it)",
    "mirroring": f"{_REPO}:predict.sh (--disable_tta); {_TRAINER} line 86 (no mirroring in training)",
    "data_resampling": f"{_REPO}:nnunet/preprocessing/preprocessing.py line 75 (torch trilinear to the target spacing)",
    "seg_resampling": f"{_REPO}:nnunet/inference/predict.py line 550 (argmax resampled back with order 0)",
    "not_carried": (f"{_REPO}:nnunet/network_architecture/neural_network.py lines 274-276, 472: their own "
                    "sliding window (3 x 3 fixed in-plane tiles around the centre, centre tile first, z "
                    "tiles skipped after an empty centre tile); nnU-Net's predictor has no such mode"),
}
# Normalisation statistics: nominal abdominal CT values (time does not depend on them).
CT_INTENSITIES = {"max": 3071.0, "mean": 90.0, "median": 80.0, "min": -1024.0,
                  "percentile_00_5": -960.0, "percentile_99_5": 330.0, "std": 140.0}
LABELS = ("background", "liver", "right_kidney", "spleen", "pancreas", "aorta", "ivc", "right_adrenal",
          "left_adrenal", "gallbladder", "esophagus", "stomach", "duodenum", "left_kidney")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "nnUNet_def_n_proc")
RESULT_TAG = "PEERS_RESULT "


def winner_plans(threads: int = 2) -> tuple[dict, dict]:
    """(plans, dataset_json) in nnU-Net v2's plans.json format for the winner's small 3D
    full-resolution network; ``threads`` bounds nnU-Net's torch resampling."""
    w = WINNER
    n = len(w["features_per_stage"])
    if not (len(w["kernel_sizes"]) == len(w["strides"]) == n):
        raise ValueError("WINNER: one kernel size and one stride per stage")
    torch_resampling = "resample_torch_fornnunet"
    configuration = {
        "data_identifier": "nnUNetPlans_FLARE22Small_3d_fullres",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": list(w["patch_size"]),
        "median_image_size_in_voxels": [125, 341, 341],
        "spacing": list(w["target_spacing"]),
        "normalization_schemes": ["CTNormalization"],
        "use_mask_for_norm": [False],
        "resampling_fn_data": torch_resampling,
        "resampling_fn_data_kwargs": {"is_seg": False, "force_separate_z": False, "mode": "linear",
                                      "num_threads": threads},
        "resampling_fn_seg": torch_resampling,
        "resampling_fn_seg_kwargs": {"is_seg": True, "force_separate_z": False, "num_threads": threads},
        "resampling_fn_probabilities": torch_resampling,
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "force_separate_z": False, "mode": "nearest",
                                               "num_threads": threads},
        "architecture": {
            "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {
                "n_stages": n,
                "features_per_stage": list(w["features_per_stage"]),
                "conv_op": "torch.nn.modules.conv.Conv3d",
                "kernel_sizes": [list(k) for k in w["kernel_sizes"]],
                "strides": [list(s) for s in w["strides"]],
                "n_conv_per_stage": [w["n_conv_per_stage"]] * n,
                "n_conv_per_stage_decoder": [w["n_conv_per_stage"]] * (n - 1),
                "conv_bias": True,
                "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                "dropout_op": None,
                "dropout_op_kwargs": None,
                "nonlin": "torch.nn.LeakyReLU",
                "nonlin_kwargs": {"negative_slope": 0.01, "inplace": True},
            },
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        },
        "batch_dice": True,
    }
    plans = {
        "dataset_name": "Dataset026_FLARE22Small",
        "plans_name": "nnUNetPlansFLARE22Small",
        "original_median_spacing_after_transp": [2.5, 0.8, 0.8],
        "original_median_shape_after_transp": [200, 512, 512],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": configuration},
        "experiment_planner_used": "built in code by bench/peers.py (winner's FLARE22Small plans)",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": dict(CT_INTENSITIES)},
    }
    dataset = {"channel_names": {"0": "CT"}, "labels": {name: i for i, name in enumerate(LABELS)},
               "numTraining": 50, "file_ending": ".nii.gz"}
    return plans, dataset


def resampled_shape(shape_zyx, spacing_zyx, target_zyx=WINNER["target_spacing"]) -> tuple[int, ...]:
    """The grid at the target spacing, rounded as nnU-Net rounds it."""
    return tuple(int(round(n * s / t)) for n, s, t in zip(shape_zyx, spacing_zyx, target_zyx))


def tile_count(shape_zyx, patch=WINNER["patch_size"], step: float = WINNER["tile_step_size"]) -> int:
    """Tiles nnU-Net's sliding window runs on a (padded) grid: per axis
    ceil((size - patch) / (patch * step)) + 1 (a single tile where the patch covers it)."""
    count = 1
    for size, p in zip(shape_zyx, patch):
        size = max(size, p)
        count *= math.ceil((size - p) / (p * step)) + 1
    return count


def winner_tile_bound(shape_zyx, patch=WINNER["patch_size"], step: float = WINNER["tile_step_size"]) -> int:
    """Upper bound of the tiles the winner's own sliding window runs: nnU-Net's z steps times
    3 x 3 in-plane tiles (fewer where empty centre tiles skip a z step)."""
    z = max(shape_zyx[0], patch[0])
    return (math.ceil((z - patch[0]) / (patch[0] * step)) + 1) * 9


def ratio_rows(results: list[dict], ours: tuple[str, ...], peers: tuple[str, ...], key: str = "seconds") -> list[dict]:
    """Our time / the peer's time for each case both ran, then the median over cases.

    ``results``: one dict per (case, contender) with "case", "contender" and ``key``
    ("seconds": wall; "cpu_s": the process's CPU time, all threads; None where the run
    failed). Pairs come from the same case of the same run only."""
    by = {(r["case"], r["contender"]): r.get(key) for r in results}
    cases = sorted({r["case"] for r in results})
    rows = []
    for o in ours:
        for p in peers:
            per_case = [by[(c, o)] / by[(c, p)] for c in cases
                        if by.get((c, o)) and by.get((c, p))]
            rows.append({"ours": o, "peer": p, "per_case": per_case,
                         "median": statistics.median(per_case) if per_case else None})
    return rows


OUR_RUNTIMES = ("ort", "openvino")
OUR_PRECISIONS = ("fp32", "int8", "bf16")  # app.backends.PRECISIONS less "auto"


def ours_spec(value: str) -> dict:
    """``SIZE[/RUNTIME[/PRECISION]]`` (tiny or paper; ort or openvino; fp32, int8 or bf16) -> a
    contender: ``paper`` is ONNX Runtime fp32, ``paper/openvino/int8`` OpenVINO on int8 graphs."""
    parts = value.split("/")
    size, runtime, precision = parts + ["ort", "fp32"][len(parts) - 1:] if len(parts) <= 3 else (None, None, None)
    if size not in ("tiny", "paper") or runtime not in OUR_RUNTIMES or precision not in OUR_PRECISIONS:
        raise argparse.ArgumentTypeError(
            f"{value!r}: give SIZE[/RUNTIME[/PRECISION]] with SIZE tiny|paper, RUNTIME {'|'.join(OUR_RUNTIMES)}, "
            f"PRECISION {'|'.join(OUR_PRECISIONS)}")
    name = "-".join(["ours", size] + ([runtime] if runtime != "ort" or precision != "fp32" else [])
                    + ([precision] if precision != "fp32" else []))
    return {"name": name, "kind": "ours", "bundle": size, "runtime": runtime, "precision": precision}


def contenders(args) -> list[dict]:
    """What runs, in the base order of each case."""
    out = [{"name": "nnunet", "kind": "nnunet", "mirror": False}]
    if args.mirror:
        out.append({"name": "nnunet-mirror", "kind": "nnunet", "mirror": True})
    names = set()
    for spec in args.ours:
        if spec["name"] not in names:
            names.add(spec["name"])
            out.append(spec)
    return out


def check_args(p: argparse.ArgumentParser, args) -> None:
    if args.threads not in (1, 2):
        p.error(f"--threads must be 1 or 2 (the same for every contender), got {args.threads}")
    if args.slices < 8:
        p.error(f"--slices must be at least 8, got {args.slices}")
    if args.in_plane < 64:
        p.error(f"--in-plane must be at least 64, got {args.in_plane}")


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("--slices", type=positive_int, default=200, help="N of the 512 x 512 x N cases (default 200)")
    p.add_argument("--in-plane", type=positive_int, default=512, help="in-plane size (default 512)")
    p.add_argument("--spacing", type=positive_float, nargs=3, default=(0.8, 0.8, 2.5), metavar=("X", "Y", "Z"),
                   help="voxel spacing in mm (default 0.8 0.8 2.5)")
    p.add_argument("--cases", type=positive_int, default=1, help="phantom cases (default 1)")
    p.add_argument("--seed", type=nonneg_int, default=8000, help="first phantom seed (default 8000)")
    p.add_argument("--order-offset", type=nonneg_int, default=0,
                   help="rotate the contenders' order by this much (case i runs them rotated by offset + i)")
    p.add_argument("--threads", type=positive_int, default=2, help="threads for every contender: 1 or 2 (default 2)")
    p.add_argument("--mirror", action=argparse.BooleanOptionalAction, default=True,
                   help="also run nnU-Net with mirroring (default on)")
    p.add_argument("--ours", nargs="*", type=ours_spec, default=[ours_spec("tiny"), ours_spec("paper")],
                   metavar="SIZE[/RUNTIME[/PRECISION]]",
                   help="our contenders (default: tiny paper, i.e. ONNX Runtime fp32); e.g. paper/openvino")
    p.add_argument("--tiny-bundle", type=Path, default=None, help="a tiny bundle (default: random, exported)")
    p.add_argument("--paper-bundle", type=Path, default=None, help="a paper-size bundle (default: random, exported)")
    p.add_argument("--peer-python", type=Path, default=ROOT / ".venv-peers" / "bin" / "python",
                   help="the python with nnunetv2 (default .venv-peers/bin/python: make peers-setup)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "peers", help="work folder")
    p.add_argument("--json", type=Path, default=None, help="also write the results here as JSON")
    p.add_argument("--timeout", type=positive_int, default=1500, help="seconds allowed to one subprocess")
    # the worker side: one case, one contender, in this process
    p.add_argument("--worker", choices=("nnunet", "ours"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--case", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--bundle", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--pred-dir", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--runtime", choices=OUR_RUNTIMES, default="ort", help=argparse.SUPPRESS)
    p.add_argument("--precision", choices=OUR_PRECISIONS, default="fp32", help=argparse.SUPPRESS)
    return p


# ---------------------------------------------------------------- workers (one case each)

def _peak_rss_mb() -> float:
    """This process's peak resident set since its exec (VmHWM); ru_maxrss would also count
    the driver's memory copied at fork, before exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def worker_nnunet(case: Path, pred_dir: Path, threads: int, mirror: bool) -> dict:
    """One case through nnU-Net's predictor; the steps of predict_single_npy_array, timed."""
    t_load = time.perf_counter()
    import torch
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.data_iterators import PreprocessAdapterFromNpy
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    plans, dataset = winner_plans(threads)
    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    arch = cm.network_arch_init_kwargs
    net = get_network_from_plans(cm.network_arch_class_name, arch, cm.network_arch_init_kwargs_req_import,
                                 1, NUM_CLASSES, allow_init=True, deep_supervision=False)
    params = sum(p.numel() for p in net.parameters())
    predictor = nnUNetPredictor(tile_step_size=WINNER["tile_step_size"], use_gaussian=True, use_mirroring=mirror,
                                perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.manual_initialization(net, pm, cm, [net.state_dict()], dataset, "nnUNetTrainerV2_FLARE_Small",
                                    (0, 1, 2))
    load_s = time.perf_counter() - t_load

    io = SimpleITKIO()
    c0, t0 = time.process_time(), time.perf_counter()
    image, props = io.read_images([str(case)])
    t_read = time.perf_counter() - t0
    ppa = PreprocessAdapterFromNpy([image], [None], [props], [None], pm, dataset, cm,
                                   num_threads_in_multithreaded=1, verbose=False)
    dct = next(ppa)
    t_pre = time.perf_counter() - t0 - t_read
    grid = tuple(dct["data"].shape[1:])
    padded = tuple(max(g, p) for g, p in zip(grid, WINNER["patch_size"]))  # nnU-Net pads up to a patch
    tiles = len(predictor._internal_get_sliding_window_slicers(padded))
    t1 = time.perf_counter()
    logits = predictor.predict_logits_from_preprocessed_data(dct["data"]).cpu()
    t_net = time.perf_counter() - t1
    t1 = time.perf_counter()
    seg = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, pm, cm, predictor.label_manager, dct["data_properties"], return_probabilities=False,
        num_threads_torch=threads)
    del logits
    t_back = time.perf_counter() - t1
    t1 = time.perf_counter()
    io.write_seg(seg, str(pred_dir / f"{_case_id(case)}.nii.gz"), props)
    t_write = time.perf_counter() - t1
    seconds, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": seconds, "cpu_s": cpu_s, "load_s": load_s, "params": params, "grid": list(grid), "tiles": tiles,
            "passes_per_tile": 8 if mirror else 1,
            "stages": {"read": t_read, "preprocess": t_pre, "sliding_window": t_net, "resample_back": t_back,
                       "write": t_write},
            "torch": torch.__version__, "threads": torch.get_num_threads(), "foreground": float((seg > 0).mean())}


def worker_ours(case: Path, pred_dir: Path, threads: int, bundle_dir: Path, runtime: str = "ort",
                precision: str = "fp32") -> dict:
    """One case through the appliance: read, predict, write."""
    t_load = time.perf_counter()
    from app.bundle import load_bundle
    from app.ctio import read_ct, write_labels
    from app.predict import PredictOptions, Predictor

    bundle = load_bundle(bundle_dir)
    extra = {}
    if "precision" in PredictOptions.__dataclass_fields__:  # the appliance's runtime choice (issue 18)
        extra = {"runtime": runtime, "precision": precision}
    elif (runtime, precision) != ("ort", "fp32"):
        raise SystemExit(f"this checkout's appliance has no runtime choice: {runtime}/{precision} cannot run")
    predictor = Predictor(bundle, PredictOptions(device="cpu", threads=threads, **extra))
    load_s = time.perf_counter() - t_load
    c0, t0 = time.process_time(), time.perf_counter()
    volume, props = read_ct(case)
    t_read = time.perf_counter() - t0
    labels, report = predictor.predict_volume(volume)
    t_pred = time.perf_counter() - t0 - t_read
    t1 = time.perf_counter()
    write_labels(labels, props, pred_dir / f"{_case_id(case)}.nii.gz")
    t_write = time.perf_counter() - t1
    seconds, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    stages = {"read": t_read, **{k: float(v) for k, v in report.get("timings", {}).items()}, "write": t_write}
    return {"seconds": seconds, "cpu_s": cpu_s, "load_s": load_s, "predict_s": t_pred, "stages": stages, "mode": report["mode"],
            "providers": predictor.info.get("providers") if isinstance(predictor.info, dict) else None,
            "sampled": len(report.get("sampled", [])), "foreground": float((labels > 0).mean()),
            "runtime": predictor.info.get("runtime", "ort"), "precision": predictor.info.get("precision", "fp32")}


def _case_id(path: Path) -> str:
    return path.name.replace("_0000.nii.gz", "")


def run_worker(args) -> int:
    args.pred_dir.mkdir(parents=True, exist_ok=True)
    if args.worker == "nnunet":
        res = worker_nnunet(args.case, args.pred_dir, args.threads, args.mirror)
    else:
        res = worker_ours(args.case, args.pred_dir, args.threads, args.bundle, args.runtime, args.precision)
    res["peak_rss_mb"] = _peak_rss_mb()
    print(RESULT_TAG + json.dumps(res), flush=True)
    return 0


# ---------------------------------------------------------------- the driver

def prepare_cases(args) -> list[Path]:
    from app.ctio import atomic_write_image
    from evaluation.phantom import generate

    folder = args.out / "cases"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    sx, sy, sz = args.spacing
    for i in range(args.cases):
        seed = args.seed + i
        path = folder / f"peer_{seed}_{args.slices}x{args.in_plane}_{sx:g}x{sy:g}x{sz:g}_0000.nii.gz"
        if not path.exists():
            img, _ = generate(seed, (args.slices, args.in_plane, args.in_plane), spacing=(sx, sy, sz)).images()
            atomic_write_image(img, path)
        paths.append(path)
    return paths


def prepare_bundle(size: str, given: Path | None, out: Path) -> Path:
    if given is not None:
        return given
    path = out / "bundles" / size
    if not (path / "manifest.json").exists():
        from export.bundle import export_bundle  # torch: development install only

        print(f"exporting a random-weight {size} bundle to {path} ...", flush=True)
        export_bundle(path, ref_config=size, stcn_config=size, programs=False, quiet=True, force=path.exists())
    return path


def check_peer(python: Path) -> str | None:
    """None when ``python`` can import nnunetv2, else the reason in one line."""
    if not python.exists():
        return f"{python} not found: run `make peers-setup` (or give --peer-python)"
    r = subprocess.run([str(python), "-c", "import nnunetv2, torch; print(torch.__version__)"],
                       capture_output=True, text=True)
    if r.returncode:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        return f"{python} cannot import nnunetv2 ({last}): run `make peers-setup`"
    return None


def run_one(c: dict, case: Path, args, bundles: dict[str, Path]) -> dict:
    python = args.peer_python if c["kind"] == "nnunet" else Path(sys.executable)
    cmd = [str(python), str(Path(__file__).resolve()), "--worker", c["kind"], "--case", str(case),
           "--threads", str(args.threads), "--pred-dir", str(args.out / "pred" / c["name"])]
    if c["kind"] == "nnunet":
        cmd.append("--mirror" if c["mirror"] else "--no-mirror")
    else:
        cmd += ["--bundle", str(bundles[c["bundle"]]), "--runtime", c["runtime"], "--precision", c["precision"]]
    env = {**os.environ, **{v: str(args.threads) for v in THREAD_VARS}, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"seconds": None, "error": f"timed out after {args.timeout} s"}
    wall = time.perf_counter() - t0
    for line in r.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return {**json.loads(line[len(RESULT_TAG):]), "process_s": wall}
    tail = (r.stderr.strip().splitlines() or r.stdout.strip().splitlines() or ["no output"])[-1]
    return {"seconds": None, "error": f"exit {r.returncode}: {tail}", "process_s": wall}


def table(results: list[dict], names: list[str]) -> list[dict]:
    rows = []
    for n in names:
        mine = [r for r in results if r["contender"] == n]
        secs = [r["seconds"] for r in mine if r.get("seconds")]
        rss = [r["peak_rss_mb"] for r in mine if r.get("peak_rss_mb")]
        cpu = [r["cpu_s"] for r in mine if r.get("cpu_s")]
        rows.append({"contender": n, "runs": len(mine), "ok": len(secs),
                     "median_s": statistics.median(secs) if secs else None,
                     "median_cpu_s": statistics.median(cpu) if cpu else None,
                     "peak_rss_mb": max(rss) if rss else None,
                     "load_s": statistics.median([r["load_s"] for r in mine if r.get("load_s")] or [0])})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.worker:
        return run_worker(args)
    check_args(p, args)
    cs = contenders(args)
    why = check_peer(args.peer_python)
    if why:
        print(f"peers: {why}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = sorted({c["bundle"] for c in cs if c["kind"] == "ours"})
    bundles = {s: prepare_bundle(s, getattr(args, f"{s}_bundle"), args.out) for s in sizes}
    cases = prepare_cases(args)
    spacing_zyx = (args.spacing[2], args.spacing[1], args.spacing[0])
    shape = (args.slices, args.in_plane, args.in_plane)
    grid = resampled_shape(shape, spacing_zyx)
    print(f"{len(cases)} case(s) {args.in_plane} x {args.in_plane} x {args.slices}, spacing "
          f"{' x '.join(f'{v:g}' for v in args.spacing)} mm; nnU-Net grid at {WINNER['target_spacing']} mm: "
          f"{grid}, {tile_count(grid)} tiles of {WINNER['patch_size']} at step {WINNER['tile_step_size']} "
          f"(the winner's own window: at most {winner_tile_bound(grid)}); {args.threads} thread(s) each", flush=True)
    load_before = os.getloadavg()[0]
    results = []
    for i, case in enumerate(cases):
        k = (args.order_offset + i) % len(cs)
        order = cs[k:] + cs[:k]
        for c in order:
            res = run_one(c, case, args, bundles)
            res.update(case=_case_id(case), contender=c["name"])
            results.append(res)
            shown = f"{res['seconds']:.1f} s, peak RSS {res['peak_rss_mb']:.0f} MB" if res.get("seconds") else res["error"]
            print(f"  {_case_id(case)} {c['name']:<14} {shown}", flush=True)
    load_after = os.getloadavg()[0]
    names = [c["name"] for c in cs]
    rows = table(results, names)
    peers = tuple(n for n in names if n.startswith("nnunet"))
    ours_names = tuple(n for n in names if n.startswith("ours"))
    ratios = ratio_rows(results, ours_names, peers)
    cpu_ratios = ratio_rows(results, ours_names, peers, key="cpu_s")
    print(f"\n1-min load average {load_before:.2f} before, {load_after:.2f} after, {os.cpu_count()} cores")
    print(f"{'contender':<14} {'s per case':>10} {'CPU s':>7} {'peak RSS MB':>11} {'load s':>7}  runs")
    for r in rows:
        s = f"{r['median_s']:.1f}" if r["median_s"] else "-"
        c = f"{r['median_cpu_s']:.1f}" if r["median_cpu_s"] else "-"
        m = f"{r['peak_rss_mb']:,.0f}" if r["peak_rss_mb"] else "-"
        print(f"{r['contender']:<14} {s:>10} {c:>7} {m:>11} {r['load_s']:>7.1f}  {r['ok']}/{r['runs']}")
    print(f"\n{'ours / peer':<28} {'time':>6} {'CPU':>6}  time per case")
    for r, c in zip(ratios, cpu_ratios):
        med = f"{r['median']:.2f}" if r["median"] is not None else "-"
        cmed = f"{c['median']:.2f}" if c["median"] is not None else "-"
        print(f"{r['ours'] + ' / ' + r['peer']:<28} {med:>6} {cmed:>6}  {', '.join(f'{v:.2f}' for v in r['per_case'])}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"slices": args.slices, "in_plane": args.in_plane, "spacing_xyz": list(args.spacing),
                "threads": args.threads, "cases": args.cases, "seed": args.seed, "nnunet_grid": list(grid),
                "tiles": tile_count(grid), "winner_tile_bound": winner_tile_bound(grid),
                "load_before": load_before, "load_after": load_after, "cpu_count": os.cpu_count(),
                "bundles": {k: str(v) for k, v in bundles.items()}, "winner": WINNER, "sources": SOURCES}
        args.json.write_text(json.dumps({"meta": meta, "results": results, "table": rows, "ratios": ratios,
                                         "cpu_ratios": cpu_ratios},
                                        indent=2, default=list))
    return 0 if all(r.get("seconds") for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
