"""Checkpoints -> a model bundle the appliance runs, with a numerical parity check.

    flare22 export --reference CKPT --propagation CKPT --out BUNDLE_DIR
    flare22 export --random tiny --out BUNDLE_DIR      # random weights, for tests and benchmarks

Graphs (ONNX, opset 17, named inputs and outputs, dynamic axes where the appliance needs
them; the model input size is fixed by the bundle):

=============  ===========================================  =================================
reference      image (B,3,H,W), position (B,)               probs (summed softmax), probs_a, probs_b
stcn_key       image (B,3,H,W)                              key, query_value, f16, f8, f4
stcn_skip      f8 (B,C8,2h,2w), f4 (B,C4,4h,4w)             s8, s4
stcn_value     image, f16, masks (O,..), others (O,..)      values (O,Cv,hc,wc)  [crops: any hc, wc]
stcn_decode    readout (O,..), query_value, s8, s4          logits (O,1,Hc,Wc)   [crops: any size]
stcn_read      mem_keys (Ck,N), mem_values (O,Cv,N),        readout (O,Cv,P)  (measured against
               query_key (Ck,P)                             the appliance's numpy read)
=============  ===========================================  =================================

Each graph is also saved as a ``torch.export`` program (``.pt2``) for the torch backend that
GPU measurements use: ``torch.jit`` is deprecated in torch 2.14, and ``torch.export`` keeps
dynamic shapes explicit. Optional fp16 ONNX copies (``--fp16``) get their own parity rows.

Parity: every graph against its torch module on fresh random inputs, at two organ counts,
two crop sizes and two memory lengths: max |difference| <= 1e-3 (fp32), and >= 99.9 %
argmax agreement on the reference output. The export fails loudly when it does not hold.
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
from app.labels import CLASS_NAMES
from app.propagation import PropagationConfig, read_memory
from app.predict import DEFAULT_MODE, DEFAULT_SAMPLING, MODES, propagation_option
from app.windowing import DEFAULT_WINDOWS
from app.errors import Flare22Error
from training.models.reference import REFERENCE_CONFIGS, build_reference_pair
from training.models.stcn import STCN, STCN_CONFIGS, build_stcn

log = logging.getLogger("flare22.export")
OPSET = 17
ATOL = 1e-3
ARGMAX_AGREEMENT = 0.999


class ParityError(Flare22Error):
    pass


class CPSPair(nn.Module):
    """The reference pair as one graph: summed softmax and each member's softmax."""

    def __init__(self, a: nn.Module, b: nn.Module):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, image, position):
        pa = torch.softmax(self.a(image, position), dim=1)
        pb = torch.softmax(self.b(image, position), dim=1)
        return pa + pb, pa, pb


class _Stage(nn.Module):
    def __init__(self, net: STCN, fn):
        super().__init__()
        self.net, self.fn = net, fn

    def forward(self, *xs):
        return self.fn(self.net, *xs)


def _key(net, image):
    return net.encode_key(image)


def _skip(net, f8, f4):
    return net.skip_features(f8, f4)


def _value(net, image, f16, masks, others):
    return net.encode_value(image, f16, masks, others)


def _decode(net, readout, qv, s8, s4):
    return net.decode(readout, qv, s8, s4)


class _Read(nn.Module):
    def __init__(self, net: STCN, top_k: int):
        super().__init__()
        self.net, self.top_k = net, top_k

    def forward(self, mem_keys, mem_values, query_key):
        ck, p = query_key.shape
        out = self.net.read_memory(mem_keys, mem_values, query_key.reshape(ck, p, 1), top_k=self.top_k)
        return out.reshape(out.shape[0], out.shape[1], p)


def graph_modules(a: nn.Module, b: nn.Module, net: STCN, top_k: int) -> dict[str, nn.Module]:
    """The exported graphs' modules by name, in eval mode: the reference pair and STCN's stages."""
    return {
        "reference": CPSPair(a, b).eval(),
        "stcn_key": _Stage(net, _key).eval(),
        "stcn_skip": _Stage(net, _skip).eval(),
        "stcn_value": _Stage(net, _value).eval(),
        "stcn_decode": _Stage(net, _decode).eval(),
        "stcn_read": _Read(net, top_k).eval(),
    }


def stcn_shapes(cfg) -> dict:
    """Channel counts of the STCN features for a config (probed on a tiny input)."""
    net = build_stcn(cfg).eval()
    with torch.no_grad():
        key, qv, f16, f8, f4 = net.encode_key(torch.zeros(1, 3, 32, 32))
        s8, s4 = net.skip_features(f8, f4)
    return {"ck": key.shape[1], "cv": qv.shape[1], "c16": f16.shape[1], "c8": f8.shape[1],
            "c4": f4.shape[1], "s8": s8.shape[1], "s4": s4.shape[1]}


def graph_specs(hw: tuple[int, int], ch: dict, stride: int = 16) -> dict:
    """Input/output names with symbolic shapes (strings are dynamic axes)."""
    H, W = hw
    h, w = H // stride, W // stride
    return {
        "reference": {
            "inputs": [("image", ["B", 3, H, W]), ("position", ["B"])],
            "outputs": [("probs", ["B", 14, H, W]), ("probs_a", ["B", 14, H, W]), ("probs_b", ["B", 14, H, W])],
        },
        "stcn_key": {
            "inputs": [("image", ["B", 3, H, W])],
            "outputs": [("key", ["B", ch["ck"], h, w]), ("query_value", ["B", ch["cv"], h, w]),
                        ("f16", ["B", ch["c16"], h, w]), ("f8", ["B", ch["c8"], 2 * h, 2 * w]),
                        ("f4", ["B", ch["c4"], 4 * h, 4 * w])],
        },
        "stcn_skip": {
            "inputs": [("f8", ["B", ch["c8"], "h8", "w8"]), ("f4", ["B", ch["c4"], "h4", "w4"])],
            "outputs": [("s8", ["B", ch["s8"], "h8", "w8"]), ("s4", ["B", ch["s4"], "h4", "w4"])],
        },
        "stcn_value": {
            "inputs": [("image", [1, 3, "Hc", "Wc"]), ("f16", [1, ch["c16"], "hc", "wc"]),
                       ("masks", ["O", "Hc", "Wc"]), ("others", ["O", "Hc", "Wc"])],
            "outputs": [("values", ["O", ch["cv"], "hc", "wc"])],
        },
        "stcn_decode": {
            "inputs": [("readout", ["O", ch["cv"], "hc", "wc"]), ("query_value", [1, ch["cv"], "hc", "wc"]),
                       ("s8", [1, ch["s8"], "h8", "w8"]), ("s4", [1, ch["s4"], "h4", "w4"])],
            "outputs": [("logits", ["O", 1, "Hc", "Wc"])],
        },
        "stcn_read": {
            "inputs": [("mem_keys", [ch["ck"], "N"]), ("mem_values", ["O", ch["cv"], "N"]),
                       ("query_key", [ch["ck"], "P"])],
            "outputs": [("readout", ["O", ch["cv"], "P"])],
        },
    }


def sample_inputs(name: str, hw, ch: dict, rng: np.random.Generator, *, b=2, o=2, cells=(4, 4), n=64, p=16):
    """Random inputs for a graph; sizes vary with the keyword arguments."""
    H, W = hw
    hc, wc = cells
    r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    u = lambda *s: rng.random(s).astype(np.float32)  # noqa: E731
    if name == "reference":
        return [u(b, 3, H, W), u(b)]
    if name == "stcn_key":
        return [u(b, 3, H, W)]
    if name == "stcn_skip":
        return [r(b, ch["c8"], 2 * hc, 2 * wc), r(b, ch["c4"], 4 * hc, 4 * wc)]
    if name == "stcn_value":
        return [u(1, 3, 16 * hc, 16 * wc), r(1, ch["c16"], hc, wc), u(o, 16 * hc, 16 * wc), u(o, 16 * hc, 16 * wc)]
    if name == "stcn_decode":
        return [r(o, ch["cv"], hc, wc), r(1, ch["cv"], hc, wc), r(1, ch["s8"], 2 * hc, 2 * wc),
                r(1, ch["s4"], 4 * hc, 4 * wc)]
    if name == "stcn_read":
        return [r(ch["ck"], n), r(o, ch["cv"], n), r(ch["ck"], p)]
    raise KeyError(name)


def _dynamic_axes(spec: dict) -> dict:
    axes = {}
    for nm, shape in spec["inputs"] + spec["outputs"]:
        d = {i: s for i, s in enumerate(shape) if isinstance(s, str)}
        if d:
            axes[nm] = d
    return axes


def export_onnx(module: nn.Module, example: list[np.ndarray], spec: dict, path: Path) -> None:
    args = tuple(torch.from_numpy(x) for x in example)
    torch.onnx.export(
        module, args, str(path), opset_version=OPSET, dynamo=False,
        input_names=[n for n, _ in spec["inputs"]], output_names=[n for n, _ in spec["outputs"]],
        dynamic_axes=_dynamic_axes(spec), do_constant_folding=True,
    )


def export_program(module: nn.Module, example: list[np.ndarray], spec: dict, path: Path) -> bool:
    """A torch.export program of the graph; False (logged) where torch.export refuses it."""
    args = tuple(torch.from_numpy(x) for x in example)
    dyn = []
    for (_, shape), x in zip(spec["inputs"], example):
        d = {}
        for i, s in enumerate(shape):
            if isinstance(s, str):
                d[i] = torch.export.Dim.AUTO
        dyn.append(d or None)
    try:
        shapes = (tuple(dyn),) if isinstance(module, _Stage) else tuple(dyn)  # _Stage takes *xs
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


def _parity_cases(name: str) -> list[dict]:
    if name in ("stcn_value", "stcn_decode"):
        return [{"o": 1, "cells": (4, 4)}, {"o": 3, "cells": (5, 7)}]
    if name == "stcn_read":
        return [{"o": 1, "n": 40, "p": 16}, {"o": 3, "n": 160, "p": 30}]
    if name == "stcn_skip":
        return [{"b": 1, "cells": (4, 4)}, {"b": 2, "cells": (6, 5)}]
    return [{"b": 1}, {"b": 3}]


def check_parity(name: str, module: nn.Module, onnx_path: Path, hw, ch, seed: int, *, fp16=False) -> dict:
    rng = np.random.default_rng(seed)
    sess = _ort(onnx_path)
    worst, agree = 0.0, 1.0
    sizes = []
    for case in _parity_cases(name):
        xs = sample_inputs(name, hw, ch, rng, **case)
        with torch.no_grad():
            ref = module(*[torch.from_numpy(x) for x in xs])
        ref = [ref] if isinstance(ref, torch.Tensor) else list(ref)
        feed = {i.name: x for i, x in zip(sess.get_inputs(), xs)}
        outs = sess.run(None, feed)
        for r, o in zip(ref, outs):
            worst = max(worst, float(np.abs(r.numpy() - o).max()))
        if name == "reference":
            agree = min(agree, float((ref[0].numpy().argmax(1) == outs[0].argmax(1)).mean()))
        sizes.append(case)
    tol = 5e-2 if fp16 else ATOL
    ok = worst <= tol and (name != "reference" or agree >= ARGMAX_AGREEMENT)
    return {"graph": name + (" (fp16)" if fp16 else ""), "max_abs_diff": worst, "tolerance": tol,
            "argmax_agreement": agree if name == "reference" else None, "cases": sizes, "ok": ok}


def read_parity(net: STCN, ch: dict, top_k: int, seed: int) -> dict:
    """The appliance's numpy memory read against the network's torch read_memory."""
    rng = np.random.default_rng(seed)
    worst = 0.0
    for case in _parity_cases("stcn_read"):
        mk, mv, qk = sample_inputs("stcn_read", (16, 16), ch, rng, **case)
        with torch.no_grad():
            ref = _Read(net, top_k)(torch.from_numpy(mk), torch.from_numpy(mv), torch.from_numpy(qk)).numpy()
        worst = max(worst, float(np.abs(read_memory(mk, mv, qk, top_k) - ref).max()))
    return {"graph": "read_memory (numpy)", "max_abs_diff": worst, "tolerance": ATOL, "argmax_agreement": None,
            "cases": _parity_cases("stcn_read"), "ok": worst <= ATOL}


def count_macs(name: str, module: nn.Module, hw, ch, seed: int = 0) -> dict:
    """Multiply-adds of a graph, normalised to the unit the appliance counts it in."""
    from torch.utils.flop_counter import FlopCounterMode

    rng = np.random.default_rng(seed)
    b, o, cells = 2, 2, (4, 4)
    xs = sample_inputs(name, hw, ch, rng, b=b, o=o, cells=cells)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(*[torch.from_numpy(x) for x in xs])
    macs = counter.get_total_flops() / 2
    n_cells = cells[0] * cells[1]
    unit = {"reference": ("slice", b), "stcn_key": ("slice", b), "stcn_skip": ("cell", b * n_cells),
            "stcn_value": ("organ_cell", o * n_cells), "stcn_decode": ("organ_cell", o * n_cells)}.get(name)
    if unit is None:
        return {}
    return {"per": unit[0], "macs": macs / unit[1]}


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
    hw = (size, size)
    a.eval(), b.eval(), net.eval()
    ch = stcn_shapes(net.cfg)
    specs = graph_specs(hw, ch)
    prop = PropagationConfig(top_k=net.cfg.top_k).with_overrides(prop_overrides or {})
    modules = graph_modules(a, b, net, prop.top_k)
    rng = np.random.default_rng(seed)
    graphs, parity = {}, []
    for name, module in modules.items():
        spec = specs[name]
        example = sample_inputs(name, hw, ch, rng)
        onnx_file = f"{name}.onnx"
        export_onnx(module, example, spec, out / onnx_file)
        g = {"onnx": onnx_file,
             "inputs": [{"name": n, "shape": s, "dtype": "float32"} for n, s in spec["inputs"]],
             "outputs": [{"name": n, "shape": s, "dtype": "float32"} for n, s in spec["outputs"]]}
        parity.append(check_parity(name, module, out / onnx_file, hw, ch, seed + 1))
        if fp16 and to_fp16(out / onnx_file, out / f"{name}.fp16.onnx"):
            g["onnx_fp16"] = f"{name}.fp16.onnx"
            parity.append(check_parity(name, module, out / g["onnx_fp16"], hw, ch, seed + 2, fp16=True))
        if name == "stcn_read":  # top_k is baked in: the graph needs N >= top_k memory entries
            g["requires"] = f"N >= {prop.top_k}; the appliance reads memory in numpy (app.propagation)"
        cost = count_macs(name, module, hw, ch)
        if cost:
            g["cost"] = cost
        if programs and export_program(module, example, spec, out / f"{name}.pt2"):
            g["torch"] = f"{name}.pt2"
        graphs[name] = g
    parity.append(read_parity(net, ch, prop.top_k, seed + 3))
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
        **base_manifest(hw, prop, sampling),
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
