"""int8 graphs for a bundle: ONNX Runtime static quantisation, written into a new sealed bundle.

    flare22 quantize --bundle BUNDLE --calibration DIR [DIR ...] --out NEW_BUNDLE
                     [--graphs reference] [--slices 24] [--min-agreement 0.995]

Calibration: ``--slices`` axial slices from every CT of each ``--calibration`` folder (its
``images/`` subfolder when it has one; ``*_0000.nii.gz`` / ``.nii`` / ``.mha``), evenly spaced,
windowed and resized exactly as the appliance feeds them (``app.windowing.model_slices``), at
their relative position z / N. Every other one of them calibrates, the rest check parity.

Quantisation: QDQ format, per-channel symmetric int8 weights, uint8 activations with min-max
ranges (what VNNI CPUs run fastest, and what OpenVINO reads as int8), only the convolutions
and matrix products (``Conv``, ``MatMul``, ``Gemm``): softmax, normalisation and the output
stay fp32. The graph is first run through ONNX Runtime's pre-processing (shape inference and
folding) where it accepts it.

The new bundle holds every file of the old one plus ``<graph>.int8.onnx`` (``onnx_int8`` in
the manifest's graph table) and a ``quantization`` record: method, calibration sources and
slice counts, and the parity of each int8 graph against its fp32 graph on the held-out
slices (max |difference| of each output; for the reference pair also the argmax agreement
of the summed probabilities). Below ``--min-agreement`` the bundle is not written. The
appliance runs the int8 graphs by default (``--precision auto``) on either runtime.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from app.argtypes import existing_dir, positive_int, probability
from app.bundle import Bundle, load_bundle, sha256_file
from app.ctio import list_cases, read_ct
from app.errors import Flare22Error
from app.windowing import model_slices

log = logging.getLogger("flare22.quantize")
IMAGE_GRAPHS = ("reference", "stcn_key")  # graphs whose inputs are CT slices (calibratable from CTs)
OP_TYPES = ("Conv", "MatMul", "Gemm")
MIN_AGREEMENT = 0.995


def calibration_slices(folders, bundle: Bundle, per_volume: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(images (N, 3, H, W), positions (N,), sources) from every CT in ``folders``."""
    images, positions, sources = [], [], []
    for folder in folders:
        folder = Path(folder)
        cases = list_cases(folder / "images" if (folder / "images").is_dir() else folder)
        if not cases:
            raise Flare22Error(f"calibration folder {folder}: no *_0000.nii.gz / .nii / .mha CT")
        for path in cases:
            volume, _ = read_ct(path)
            n = volume.shape[0]
            z = np.unique(np.linspace(0, n - 1, min(per_volume, n)).round().astype(int))
            images.append(model_slices(volume, z, bundle.windows, bundle.input_size))
            positions.append((z / n).astype(np.float32))
            sources.append({"case": path.name, "folder": str(folder), "slices": len(z)})
    return np.concatenate(images), np.concatenate(positions), sources


def _feeds(graph: dict, images: np.ndarray, positions: np.ndarray):
    names = [i["name"] for i in graph["inputs"]]
    for i in range(len(images)):
        yield {n: (images[i : i + 1] if n == "image" else positions[i : i + 1]) for n in names}


def quantize_graph(src: Path, dst: Path, graph: dict, images: np.ndarray, positions: np.ndarray) -> None:
    """ONNX Runtime static QDQ quantisation of one graph, calibrated on these slices."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = _feeds(graph, images, positions)

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        except Exception as exc:  # noqa: BLE001 - pre-processing is an optimisation only
            log.warning("quantisation pre-processing of %s failed (%s); quantising the graph as it is",
                        src.name, str(exc).splitlines()[0][:160])
            pre = src
        quantize_static(
            str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=list(OP_TYPES),
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
        )


def graph_parity(fp32: Path, int8: Path, graph: dict, images: np.ndarray, positions: np.ndarray) -> dict:
    """The int8 graph against the fp32 one on these slices (ONNX Runtime, CPU)."""
    import onnxruntime as ort

    from app.backends import ort_session_options

    runs = [ort.InferenceSession(str(p), ort_session_options(), providers=["CPUExecutionProvider"]) for p in (fp32, int8)]
    outputs = [o["name"] for o in graph["outputs"]]
    worst = {o: 0.0 for o in outputs}
    same = total = 0
    for feed in _feeds(graph, images, positions):
        a, b = (s.run(outputs, feed) for s in runs)
        for name, x, y in zip(outputs, a, b):
            worst[name] = max(worst[name], float(np.abs(x - y).max()))
        if "probs" in outputs:
            same += int((a[0].argmax(1) == b[0].argmax(1)).sum())
            total += a[0][:, 0].size
    row = {"max_abs_diff": worst, "slices": len(images)}
    if total:
        row["argmax_agreement"] = same / total
    return row


def quantize_bundle(src: str | Path, out: str | Path, calibration, *, graphs=("reference",), per_volume: int = 24,
                    min_agreement: float = MIN_AGREEMENT, force: bool = False) -> dict:
    """A new sealed bundle at ``out``: ``src``'s files plus int8 copies of ``graphs``."""
    from export.bundle import _finish_out, _prepare_out

    bundle = load_bundle(src)
    for name in graphs:
        if name not in IMAGE_GRAPHS:
            raise Flare22Error(f"quantize: graph {name!r} cannot be calibrated from CT slices "
                               f"(quantisable: {', '.join(IMAGE_GRAPHS)})")
    final = Path(out)
    if final.resolve() == bundle.path.resolve():
        raise Flare22Error("quantize: --out must be a new folder, not the source bundle")
    images, positions, sources = calibration_slices(calibration, bundle, per_volume)
    calib, check = (images[0::2], positions[0::2]), (images[1::2], positions[1::2])
    replace = _prepare_out(final, force)
    final.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.quantize-", dir=final.parent))
    tmp.chmod(0o755)
    try:
        manifest = json.loads(json.dumps(bundle.manifest))
        for rel in manifest["files"]:
            shutil.copyfile(bundle.file(rel), tmp / rel)
            (tmp / rel).chmod(0o644)
        record = {"method": "onnxruntime static, QDQ, per-channel int8 weights, uint8 activations, min-max",
                  "op_types": list(OP_TYPES), "source_bundle": str(bundle.path), "sources": sources,
                  "calibration_slices": len(calib[0]), "parity_slices": len(check[0]), "parity": {},
                  "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        for name in graphs:
            g = manifest["graphs"][name]
            rel = f"{name}.int8.onnx"
            log.info("quantising %s on %d slices", name, len(calib[0]))
            quantize_graph(tmp / g["onnx"], tmp / rel, g, *calib)
            (tmp / rel).chmod(0o644)
            row = graph_parity(tmp / g["onnx"], tmp / rel, g, *check)
            record["parity"][name] = row
            agree = row.get("argmax_agreement")
            log.info("%s int8 vs fp32 on %d held-out slices: max |diff| %s%s", name, row["slices"],
                     ", ".join(f"{k} {v:.4f}" for k, v in row["max_abs_diff"].items()),
                     "" if agree is None else f", argmax agreement {100 * agree:.2f} %")
            if agree is not None and agree < min_agreement:
                raise Flare22Error(f"quantize: {name} int8 agrees with fp32 on {100 * agree:.2f} % of pixels, "
                                   f"below --min-agreement {100 * min_agreement:.2f} %; no bundle written")
            g["onnx_int8"] = rel
            manifest["files"][rel] = ""
        import onnxruntime

        manifest["quantization"] = record
        manifest.setdefault("versions", {})["onnxruntime_quantization"] = onnxruntime.__version__
        manifest["files"] = {rel: sha256_file(tmp / rel) for rel in sorted(manifest["files"])}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
        (tmp / "manifest.json").chmod(0o644)
        _finish_out(tmp, final, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # our own mkdtemp folder, nothing else
        raise
    load_bundle(final)  # sealed: every file hashed, every graph's inputs and outputs checked
    return record


def add_arguments(p) -> None:
    p.add_argument("--bundle", required=True, help="the fp32 bundle to quantise (left unchanged)")
    p.add_argument("--calibration", required=True, nargs="+", type=existing_dir,
                   help="folders of CTs (or with an images/ subfolder) whose slices calibrate and check")
    p.add_argument("--out", required=True, help="the new bundle's folder (new or empty; a bundle only with --force)")
    p.add_argument("--force", action="store_true", help="replace the bundle already in --out")
    p.add_argument("--graphs", nargs="+", choices=IMAGE_GRAPHS, default=["reference"],
                   help="graphs to quantise (default: the reference pair, which dominates the cost)")
    p.add_argument("--slices", type=positive_int, default=24, help="slices taken from each CT (default 24)")
    p.add_argument("--min-agreement", type=probability, default=MIN_AGREEMENT,
                   help=f"refuse when the reference's argmax agreement with fp32 is below this (default {MIN_AGREEMENT})")


def run(args) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # ONNX Runtime's quantiser chats at INFO
    log.setLevel(logging.INFO)
    try:
        record = quantize_bundle(args.bundle, args.out, args.calibration, graphs=args.graphs, per_volume=args.slices,
                                 min_agreement=args.min_agreement, force=args.force)
    except Flare22Error as exc:
        print(f"flare22 quantize: {exc}", file=sys.stderr)
        return 2
    print(f"int8 bundle written to {args.out} ({record['calibration_slices']} calibration slices, "
          f"{record['parity_slices']} parity slices)")
    return 0
