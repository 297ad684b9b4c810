"""Model bundles: a folder of ONNX graphs (and optional torch.export programs) plus
``manifest.json``. The appliance loads a bundle only through :func:`load_bundle`, which
validates it; it never unpickles anything (ONNX and JSON only).

Manifest fields (format version 1)
----------------------------------
``format`` ("flare22-bundle"), ``format_version`` (1), ``classes`` (id -> name, 0 =
background), ``windows`` (see app.windowing), ``input_size`` [H, W], ``stride`` (key grid
stride), ``position_encoding``, ``sampling`` {every, max}, ``selection``, ``propagation``
(app.propagation.PropagationConfig fields), ``graphs`` (name -> {onnx, inputs, outputs},
each input/output {name, shape, dtype}; optional ``onnx_fp16`` and ``torch``), ``files``
(relative path -> sha256), ``sources`` (training configs and iterations of the source
checkpoints), ``versions`` (exporter and library versions), ``created`` (ISO time),
``parity`` (the export's parity table).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import BundleError
from .propagation import PropagationConfig
from .windowing import Window

FORMAT = "flare22-bundle"
FORMAT_VERSION = 1
REQUIRED_FIELDS = (
    "format", "format_version", "classes", "windows", "input_size", "stride", "position_encoding",
    "sampling", "selection", "propagation", "graphs", "files", "created",
)
REQUIRED_GRAPHS = ("reference", "stcn_key", "stcn_skip", "stcn_value", "stcn_decode")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Bundle:
    path: Path
    manifest: dict

    @property
    def input_size(self) -> tuple[int, int]:
        h, w = self.manifest["input_size"]
        return int(h), int(w)

    @property
    def stride(self) -> int:
        return int(self.manifest["stride"])

    @property
    def num_classes(self) -> int:
        return len(self.manifest["classes"])

    @property
    def windows(self) -> tuple[Window, ...]:
        return tuple(Window.from_json(w) for w in self.manifest["windows"])

    @property
    def propagation(self) -> PropagationConfig:
        known = PropagationConfig.__dataclass_fields__
        return PropagationConfig(**{k: v for k, v in self.manifest["propagation"].items() if k in known})

    def graph(self, name: str) -> dict:
        return self.manifest["graphs"][name]

    def file(self, rel: str) -> Path:
        return self.path / rel


def load_bundle(path: str | os.PathLike, *, verify_hashes: bool = True) -> Bundle:
    """Load and validate a bundle; every problem is a BundleError naming the bundle."""
    path = Path(path)
    if not path.exists():
        raise BundleError(path, "does not exist")
    if not path.is_dir():
        raise BundleError(path, "is not a folder")
    mpath = path / "manifest.json"
    if not mpath.exists():
        raise BundleError(path, "manifest.json is missing")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(path, f"manifest.json is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise BundleError(path, "manifest.json is not a JSON object")
    if manifest.get("format") != FORMAT:
        raise BundleError(path, f"not a {FORMAT} manifest (format={manifest.get('format')!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(path, f"unknown bundle format version {version!r}; this appliance reads {FORMAT_VERSION}")
    missing = [f for f in REQUIRED_FIELDS if f not in manifest]
    if missing:
        raise BundleError(path, f"manifest fields missing: {', '.join(missing)}")
    graphs = manifest["graphs"]
    missing_graphs = [g for g in REQUIRED_GRAPHS if g not in graphs]
    if missing_graphs:
        raise BundleError(path, f"graphs missing from the manifest: {', '.join(missing_graphs)}")
    for name, g in graphs.items():
        for key in ("onnx", "inputs", "outputs"):
            if key not in g:
                raise BundleError(path, f"graph {name!r} lacks {key!r}")
    files = manifest["files"]
    for name, g in graphs.items():
        for key in ("onnx", "onnx_fp16", "torch"):
            if key in g and g[key] not in files:
                raise BundleError(path, f"graph {name!r} file {g[key]} has no sha256 in the manifest")
    for rel, digest in files.items():
        f = path / rel
        if not f.exists():
            raise BundleError(path, f"file {rel} is missing")
        try:
            actual = sha256_file(f) if verify_hashes else digest
        except OSError as exc:
            raise BundleError(path, f"file {rel} cannot be read ({exc.strerror})") from None
        if actual != digest:
            raise BundleError(path, f"file {rel} does not match its sha256 (damaged or replaced)")
    h, w = manifest["input_size"]
    if h % manifest["stride"] or w % manifest["stride"]:
        raise BundleError(path, f"input size {h}x{w} is not a multiple of the stride {manifest['stride']}")
    return Bundle(path, manifest)
