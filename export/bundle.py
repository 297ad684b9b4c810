"""Checkpoints -> a model bundle the appliance runs, with a numerical parity check.

    flare22 export --reference CKPT --propagation CKPT --out BUNDLE_DIR
    flare22 export --random tiny --out BUNDLE_DIR      # random weights, for tests and benchmarks

Graphs (ONNX, opset 17, named inputs and outputs, dynamic axes where the appliance needs
them; the model input size is fixed by the bundle): the table ``export.graphs.GRAPHS``
gives each graph's module, names, shapes, sample inputs, parity cases and cost unit.

Each graph is also saved as a ``torch.export`` program (``.pt2``) for the torch backend that
GPU measurements use: ``torch.jit`` is deprecated in torch 2.14, and ``torch.export`` keeps
dynamic shapes explicit. Optional fp16 ONNX copies (``--fp16``) get their own parity rows.

Parity: every graph against its torch module on fresh random inputs at its parity cases
(two batch sizes, or two organ counts and two crop sizes), and the appliance's numpy memory
read against the network's torch read at two memory lengths: max |difference| <= 1e-3
(fp32), and >= 99.9 % argmax agreement on the reference output. The export fails loudly
when it does not hold.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import platform
import os
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from app.argtypes import nonneg_int, positive_int
from app.bundle import FORMAT, FORMAT_VERSION, load_bundle, sha256_file
from app.errors import Flare22Error
from app.labels import CLASS_NAMES
from app.propagation import PropagationConfig, read_memory
from app.predict import DEFAULT_MODE, DEFAULT_SAMPLING, MODES, propagation_option
from app.windowing import DEFAULT_WINDOWS
from export.graphs import GRAPHS, Dims, Graph, Stage, count_macs, modules, stcn_channels
from training.models.reference import REFERENCE_CONFIGS, build_reference_pair
from training.models.stcn import STCN, STCN_CONFIGS, build_stcn

log = logging.getLogger("flare22.export")
OPSET = 17
ATOL = 1e-3
ARGMAX_AGREEMENT = 0.999


class ParityError(Flare22Error):
    pass


def export_onnx(graph: Graph, module: nn.Module, example: list[np.ndarray], dims: Dims, path: Path) -> None:
    args = tuple(torch.from_numpy(x) for x in example)
    torch.onnx.export(
        module, args, str(path), opset_version=OPSET, dynamo=False,
        input_names=[n for n, _ in graph.inputs(dims)], output_names=[n for n, _ in graph.outputs(dims)],
        dynamic_axes=graph.dynamic_axes(dims), do_constant_folding=True,
    )


def export_program(graph: Graph, module: nn.Module, example: list[np.ndarray], dims: Dims, path: Path) -> bool:
    """A torch.export program of the graph; False (logged) where torch.export refuses it."""
    args = tuple(torch.from_numpy(x) for x in example)
    dyn = tuple({i: torch.export.Dim.AUTO for i, s in enumerate(shape) if isinstance(s, str)} or None
                for _, shape in graph.inputs(dims))
    try:
        shapes = (dyn,) if isinstance(module, Stage) else dyn  # a Stage takes *inputs
        ep = torch.export.export(module, args, dynamic_shapes=shapes, strict=False)
        torch.export.save(ep, str(path))
        return True
    except Exception as exc:  # noqa: BLE001 - the ONNX graph stays the appliance's contract
        log.warning("torch.export of %s failed (%s); the torch backend will rebuild it from weights",
                    path.name, str(exc).splitlines()[0][:200])
        return False


def to_fp16(src: Path, dst: Path) -> bool:
    try:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
        onnx.save(model, str(dst))
        return True
    except Exception as exc:  # noqa: BLE001
        log.warning("fp16 conversion of %s failed: %s", src.name, exc)
        return False


def _ort(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def check_parity(graph: Graph, module: nn.Module, onnx_path: Path, dims: Dims, seed: int, *, fp16=False) -> dict:
    """The ONNX graph against its torch module on fresh random inputs, at each parity case."""
    rng = np.random.default_rng(seed)
    sess = _ort(onnx_path)
    worst, agree = 0.0, 1.0
    for case in graph.parity:
        xs = graph.sample(dims, rng, case)
        with torch.no_grad():
            ref = module(*[torch.from_numpy(x) for x in xs])
        ref = [ref] if isinstance(ref, torch.Tensor) else list(ref)
        feed = {i.name: x for i, x in zip(sess.get_inputs(), xs)}
        outs = sess.run(None, feed)
        for r, o in zip(ref, outs):
            worst = max(worst, float(np.abs(r.numpy() - o).max()))
        if graph.name == "reference":
            agree = min(agree, float((ref[0].numpy().argmax(1) == outs[0].argmax(1)).mean()))
    tol = 5e-2 if fp16 else ATOL
    is_ref = graph.name == "reference"
    ok = worst <= tol and (not is_ref or agree >= ARGMAX_AGREEMENT)
    return {"graph": graph.name + (" (fp16)" if fp16 else ""), "max_abs_diff": worst, "tolerance": tol,
            "argmax_agreement": agree if is_ref else None, "cases": [c.to_json() for c in graph.parity], "ok": ok}


READ_CASES = ({"o": 1, "n": 40, "p": 16}, {"o": 3, "n": 160, "p": 30})  # organs, memory, query positions


def read_parity(net: STCN, ch: dict, top_k: int, seed: int) -> dict:
    """The appliance's numpy memory read against the network's torch read_memory."""
    rng = np.random.default_rng(seed)
    worst = 0.0
    for case in READ_CASES:
        mk = rng.standard_normal((ch["ck"], case["n"])).astype(np.float32)
        mv = rng.standard_normal((case["o"], ch["cv"], case["n"])).astype(np.float32)
        qk = rng.standard_normal((ch["ck"], case["p"])).astype(np.float32)
        with torch.no_grad():
            ref = net.read_memory(*map(torch.from_numpy, (mk, mv, qk)), top_k=top_k).numpy()
        worst = max(worst, float(np.abs(read_memory(mk, mv, qk, top_k) - ref).max()))
    return {"graph": "read_memory (numpy)", "max_abs_diff": worst, "tolerance": ATOL, "argmax_agreement": None,
            "cases": list(READ_CASES), "ok": worst <= ATOL}


def print_parity(rows: list[dict], file=sys.stdout) -> None:
    print(f"{'graph':<28} {'max |diff|':>12} {'tolerance':>10} {'argmax':>9}  ok", file=file)
    for r in rows:
        am = f"{100 * r['argmax_agreement']:.3f}%" if r["argmax_agreement"] is not None else "-"
        print(f"{r['graph']:<28} {r['max_abs_diff']:>12.2e} {r['tolerance']:>10.0e} {am:>9}  {'yes' if r['ok'] else 'NO'}",
              file=file)


def _load_ckpt(path, kind):
    from training.trainer import load_checkpoint

    try:
        return load_checkpoint(path, kind)  # weights_only: a checkpoint never runs code
    except FileNotFoundError:
        raise Flare22Error(f"checkpoint {path}: file does not exist") from None
    except Exception as exc:  # noqa: BLE001 - unpickling refused, damaged file, wrong kind
        detail = str(exc).strip().splitlines()
        reason = next((ln.strip() for ln in detail if "Unsupported global" in ln), detail[0] if detail else "")
        raise Flare22Error(f"checkpoint {path}: cannot be loaded safely ({type(exc).__name__}: {reason[:200]})") from None


def _prepare_out(out: Path, force: bool) -> Path | None:
    """Check that ``out`` may receive a bundle; returns the old manifest's files to remove
    (``None`` when ``out`` is new or empty). Never deletes anything itself: export writes
    into a new or empty folder, or replaces an existing bundle (recognised by its manifest,
    holding nothing but the files it lists) only with ``force``."""
    if out.is_symlink():
        raise Flare22Error(f"export: {out} is a symbolic link; give the real folder")
    if out.exists() and not out.is_dir():
        raise Flare22Error(f"export: {out} exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return None
    try:
        manifest = json.loads((out / "manifest.json").read_text())
        is_bundle = isinstance(manifest, dict) and manifest.get("format") == FORMAT
    except (OSError, ValueError):
        is_bundle = False
    if not is_bundle:
        raise Flare22Error(f"export: {out} is not empty and holds no model bundle; give a new or empty folder")
    if not force:
        raise Flare22Error(f"export: {out} already holds a model bundle; pass --force to replace it")
    listed = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
    own = {"manifest.json", *listed}
    foreign = sorted(p.name for p in out.iterdir() if p.name not in own or not p.is_file() or p.is_symlink())
    if foreign:
        raise Flare22Error(f"export: {out} holds files that are not part of its bundle ({', '.join(foreign[:5])});"
                           " not replaced")
    return out


def _finish_out(tmp: Path, out: Path, replace: Path | None) -> None:
    """Move the finished bundle from its temporary folder to ``out``."""
    if replace is not None:
        for p in list(out.iterdir()):  # only the old bundle's own files (checked by _prepare_out)
            p.unlink()
    if out.exists():
        out.rmdir()  # empty: never removes anything else
    os.replace(tmp, out)


def export_bundle(
    out_dir: str | Path,
    *,
    reference: str | Path | None = None,
    propagation: str | Path | None = None,
    ref_config: str = "tiny",
    stcn_config: str = "tiny",
    seed: int = 0,
    fp16: bool = False,
    programs: bool = True,
    sampling: dict | None = None,
    prop_overrides: dict | None = None,
    quiet: bool = False,
    force: bool = False,
) -> Path:
    """Export a bundle; random weights for whichever checkpoint is not given.

    The bundle is built in a fresh temporary folder beside ``out_dir`` and moved into place
    when complete; ``out_dir`` must be new or empty, or hold a bundle and ``force`` be set."""
    final = Path(out_dir)
    replace = _prepare_out(final, force)
    final.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix=f".{final.name}.export-", dir=final.parent))
    out.chmod(0o755)  # mkdtemp makes 0700: the image's non-root user must read the bundle
    try:
        _export_into(out, final, reference=reference, propagation=propagation, ref_config=ref_config,
                     stcn_config=stcn_config, seed=seed, fp16=fp16, programs=programs, sampling=sampling,
                     prop_overrides=prop_overrides, quiet=quiet)
        _finish_out(out, final, replace)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # our own mkdtemp folder, nothing else
        raise
    load_bundle(final)  # the appliance's own validation, once, before anyone relies on it
    return final


def _export_into(out: Path, final: Path, *, reference, propagation, ref_config, stcn_config, seed, fp16, programs, sampling,
                 prop_overrides, quiet) -> None:
    torch.manual_seed(seed)
    sources = {}
    if reference:
        state = _load_ckpt(reference, "reference")
        ref_config = state["config"]["model"]
        a, b = build_reference_pair(ref_config)
        a.load_state_dict(state["models"]["a"])
        b.load_state_dict(state["models"]["b"])
        sources["reference"] = {"checkpoint": str(reference), "iteration": state["iteration"], "config": state["config"]}
    else:
        a, b = build_reference_pair(ref_config)
        sources["reference"] = {"checkpoint": None, "random_weights": True, "config": {"model": ref_config}}
    if propagation:
        state = _load_ckpt(propagation, "propagation")
        stcn_config = state["config"]["model"]
        net = build_stcn(stcn_config)
        net.load_state_dict(state["models"]["stcn"])
        sources["propagation"] = {"checkpoint": str(propagation), "iteration": state["iteration"],
                                  "config": state["config"]}
    else:
        net = build_stcn(stcn_config)
        sources["propagation"] = {"checkpoint": None, "random_weights": True, "config": {"model": stcn_config}}
    size = REFERENCE_CONFIGS[ref_config].image_size
    if STCN_CONFIGS[stcn_config].image_size != size:
        raise Flare22Error(f"reference config {ref_config} ({size}) and STCN config {stcn_config} "
                           f"({STCN_CONFIGS[stcn_config].image_size}) differ in input size")
    a.eval(), b.eval(), net.eval()
    dims = Dims((size, size), stcn_channels(net.cfg))
    prop = PropagationConfig(top_k=net.cfg.top_k).with_overrides(prop_overrides or {})
    rng = np.random.default_rng(seed)
    graphs, parity = {}, []
    for name, module in modules(a, b, net).items():
        graph = GRAPHS[name]
        example = graph.sample(dims, rng, graph.example)
        g = graph.manifest_entry(dims) | graph.baked(net)
        export_onnx(graph, module, example, dims, out / g["onnx"])
        parity.append(check_parity(graph, module, out / g["onnx"], dims, seed + 1))
        if fp16 and to_fp16(out / g["onnx"], out / f"{name}.fp16.onnx"):
            g["onnx_fp16"] = f"{name}.fp16.onnx"
            parity.append(check_parity(graph, module, out / g["onnx_fp16"], dims, seed + 2, fp16=True))
        g["cost"] = count_macs(graph, module, dims)
        if programs and export_program(graph, module, example, dims, out / f"{name}.pt2"):
            g["torch"] = f"{name}.pt2"
        graphs[name] = g
    parity.append(read_parity(net, dims.ch, prop.top_k, seed + 3))
    if not quiet:
        print_parity(parity)
    failed = [r["graph"] for r in parity if not r["ok"]]
    if failed:
        raise ParityError(f"export to {final}: parity check failed for {', '.join(failed)}")

    # the torch backend can rebuild the networks from plain weights when a program is absent
    weights = {"reference_a.safetensors": a.state_dict(), "reference_b.safetensors": b.state_dict(),
               "stcn.safetensors": net.state_dict()}
    from safetensors.torch import save_file

    for fname, sd in weights.items():
        save_file({k: v.contiguous() for k, v in sd.items()}, str(out / fname))
        (out / fname).chmod(0o644)  # safetensors writes 0600: unreadable by the image's non-root user

    import onnx
    import onnxruntime

    manifest = {
        **base_manifest(dims.hw, prop, sampling),
        "graphs": graphs,
        "weights": {"reference_a": "reference_a.safetensors", "reference_b": "reference_b.safetensors",
                    "stcn": "stcn.safetensors"},
        "configs": {"reference": asdict(REFERENCE_CONFIGS[ref_config]), "stcn": asdict(STCN_CONFIGS[stcn_config])},
        "sources": sources,
        "parity": parity,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__, "numpy": np.__version__, "opset": OPSET},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    manifest["files"] = {f: sha256_file(out / f) for f in files}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
    (out / "manifest.json").chmod(0o644)


def base_manifest(hw, prop: PropagationConfig | None = None, sampling: dict | None = None) -> dict:
    """The model constants of a bundle (everything but graphs, files and provenance)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "classes": {str(i): n for i, n in enumerate(CLASS_NAMES)},
        "windows": [w.to_json() for w in DEFAULT_WINDOWS],
        "input_size": list(hw),
        "stride": 16,
        "position_encoding": "relative_z_plane: z / num_slices as a constant plane before the segmentation head",
        "sampling": sampling or dict(DEFAULT_SAMPLING),
        "selection": "largest_area",
        "propagation": (prop or PropagationConfig()).to_json(),
    }


def bundle_size(path: str | Path) -> dict:
    path = Path(path)
    onnx_bytes = sum(p.stat().st_size for p in path.glob("*.onnx") if ".fp16." not in p.name)
    total = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return {"onnx_mb": onnx_bytes / 2**20, "total_mb": total / 2**20}


def add_arguments(p) -> None:
    p.add_argument("--reference", help="reference (CPS pair) checkpoint")
    p.add_argument("--propagation", help="STCN checkpoint")
    p.add_argument("--random", choices=sorted(REFERENCE_CONFIGS),
                   help="export randomly initialised networks of this config for what is not given")
    p.add_argument("--out", required=True,
                   help="bundle folder to create: new or empty (an existing bundle only with --force)")
    p.add_argument("--force", action="store_true",
                   help="replace the bundle already in --out (a folder holding anything else is never touched)")
    p.add_argument("--fp16", action="store_true", help="also write fp16 ONNX graphs for GPUs")
    p.add_argument("--no-programs", action="store_true", help="skip the torch.export programs")
    p.add_argument("--every", type=positive_int, default=DEFAULT_SAMPLING["every"],
                   help=f"sampled slices: every n-th (default {DEFAULT_SAMPLING['every']})")
    p.add_argument("--max-candidates", type=positive_int, default=DEFAULT_SAMPLING["max"],
                   help=f"at most this many sampled slices (default {DEFAULT_SAMPLING['max']})")
    p.add_argument("--mode", choices=MODES, default=DEFAULT_MODE,
                   help=f"the pipeline mode the bundle runs by default (manifest sampling.mode; default {DEFAULT_MODE})")
    p.add_argument("--propagation-option", action="append", default=[], type=propagation_option,
                   metavar="KEY=VALUE", help="a sampling (every, max) or propagation setting written to the manifest")
    p.add_argument("--seed", type=nonneg_int, default=0)


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not (args.reference or args.random) or not (args.propagation or args.random):
        print("flare22 export: give --reference and --propagation checkpoints, or --random CONFIG", file=sys.stderr)
        return 2
    cfg = args.random or "tiny"
    options = dict(args.propagation_option)
    sampling = {"every": options.pop("every", args.every), "max": options.pop("max", args.max_candidates),
                "mode": args.mode}
    try:
        out = export_bundle(args.out, reference=args.reference, propagation=args.propagation, ref_config=cfg,
                            stcn_config=cfg, seed=args.seed, fp16=args.fp16, programs=not args.no_programs,
                            sampling=sampling, prop_overrides=options, force=args.force)
    except Flare22Error as exc:
        print(f"flare22 export: {exc}", file=sys.stderr)
        return 2
    size = bundle_size(out)
    print(f"bundle written to {out}: ONNX {size['onnx_mb']:.1f} MB, all files {size['total_mb']:.1f} MB")
    return 0
