"""Model bundles: a folder of ONNX graphs (and optional torch.export programs) plus
``manifest.json``. The appliance loads a bundle only through :func:`load_bundle`, which
validates it; it never unpickles anything (ONNX and JSON only).

Manifest fields (format version 1)
----------------------------------
``format`` ("flare22-bundle"), ``format_version`` (1), ``classes`` (id -> name, 0 =
background), ``windows`` (see app.windowing), ``input_size`` [H, W], ``stride`` (key grid
stride), ``position_encoding``, ``sampling`` {every, max}, ``selection``, ``propagation``
(app.propagation.PropagationConfig fields), ``graphs`` (name -> {onnx, inputs, outputs},
each input/output {name, shape, dtype}; optional ``onnx_fp16``, ``onnx_int8`` and ``torch``), ``files``
(relative path -> sha256), ``sources`` (training configs and iterations of the source
checkpoints), ``versions`` (exporter and library versions), ``created`` (ISO time),
``parity`` (the export's parity table).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
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
# a graph's files: ONNX (fp32, and optional fp16 / int8 copies with the same inputs and outputs)
# and an optional torch.export program
ONNX_KEYS = ("onnx", "onnx_fp16", "onnx_int8")
GRAPH_FILE_KEYS = (*ONNX_KEYS, "torch")


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
        return PropagationConfig(**self.manifest["propagation"])  # keys checked at load

    def graph(self, name: str) -> dict:
        return self.manifest["graphs"][name]

    def file(self, rel: str) -> Path:
        return self.path / rel


MAX_MANIFEST_BYTES = 16 << 20
MAX_FILE_BYTES = 4 << 30  # ONNX graphs are protobufs (< 2 GiB); weights stay below this too
_HEX = frozenset("0123456789abcdef")
# PropagationConfig fields that must be at least 1 (the other integers: at least 0)
_POSITIVE_PROPAGATION = frozenset({"top_k", "mem_every", "max_memory", "key_batch", "min_cells"})


def load_bundle(path: str | os.PathLike, *, verify_hashes: bool = True) -> Bundle:
    """Load and validate a bundle; every problem is a BundleError naming the bundle.

    A bundle is a sealed box: the manifest is checked against its schema (types and ranges,
    naming the field); every file it names is a regular file inside the bundle's folder
    (no absolute path, no ``..``, no link leaving it, no device), listed with its sha256 and
    read with a size limit; every ONNX graph is parsed, must keep its weights inside itself
    (external data is refused) and must have the input and output names of the manifest's
    table of graphs. All of it before any case runs."""
    path = Path(path)
    if not path.exists():
        raise BundleError(path, "does not exist")
    if not path.is_dir():
        raise BundleError(path, "is not a folder")
    root = Path(os.path.realpath(path))
    mpath = path / "manifest.json"
    if not mpath.exists() and not mpath.is_symlink():
        raise BundleError(path, "manifest.json is missing")
    raw = _read_inside(path, root, "manifest.json", MAX_MANIFEST_BYTES)
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise BundleError(path, f"manifest.json is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise BundleError(path, "manifest.json is not a JSON object")
    if manifest.get("format") != FORMAT:
        raise BundleError(path, f"not a {FORMAT} manifest (format={str(manifest.get('format'))[:40]!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise BundleError(path, f"unknown bundle format version {str(version)[:40]}; this appliance reads {FORMAT_VERSION}")
    missing = [f for f in REQUIRED_FIELDS if f not in manifest]
    if missing:
        raise BundleError(path, f"manifest fields missing: {', '.join(missing)}")
    graphs = manifest["graphs"]
    if not isinstance(graphs, dict):
        raise BundleError(path, f"manifest field graphs: must be an object (name -> graph), not {_kind(graphs)}")
    missing_graphs = [g for g in REQUIRED_GRAPHS if g not in graphs]
    if missing_graphs:
        raise BundleError(path, f"graphs missing from the manifest: {', '.join(missing_graphs)}")
    for name, g in graphs.items():
        if not isinstance(g, dict):
            raise BundleError(path, f"manifest field graphs.{name}: must be an object, not {_kind(g)}")
        for key in ("onnx", "inputs", "outputs"):
            if key not in g:
                raise BundleError(path, f"graph {name!r} lacks {key!r}")
    _check_schema(path, manifest)
    files = manifest["files"]
    for name, g in graphs.items():
        for key in GRAPH_FILE_KEYS:
            if key in g and g[key] not in files:
                raise BundleError(path, f"graph {name!r} file {g[key]} has no sha256 in the manifest")
    for key, rel in (manifest.get("weights") or {}).items():
        if rel not in files:
            raise BundleError(path, f"weights {key!r} file {rel} has no sha256 in the manifest")
    onnx_files = {g[k]: (name, g) for name, g in graphs.items() for k in ONNX_KEYS if k in g}
    for rel, digest in files.items():
        if rel in onnx_files:
            data = _read_inside(path, root, rel, MAX_FILE_BYTES)
            actual = hashlib.sha256(data).hexdigest() if verify_hashes else digest
        else:
            data, actual = None, _hash_inside(path, root, rel) if verify_hashes else digest
        if actual != digest:
            raise BundleError(path, f"file {rel} does not match its sha256 (damaged or replaced)")
        if data is not None:
            gname, g = onnx_files[rel]
            _check_graph_io(path, rel, gname, g, data)
    return Bundle(path, manifest)


def _kind(v) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def _check_schema(path: Path, m: dict) -> None:
    """Types and ranges of every field the appliance reads; the error names the field."""

    def need(ok: bool, field: str, problem: str) -> None:
        if not ok:
            raise BundleError(path, f"manifest field {field}: {problem}")

    c = m["classes"]
    need(isinstance(c, dict), "classes", f"must be an object (id -> name), not {_kind(c)}")
    need(2 <= len(c) <= 256 and sorted(c, key=lambda k: (len(k), k)) == [str(i) for i in range(len(c))],
         "classes", "ids must be 0, 1, ... (2 to 256 classes, 0 = background)")
    need(all(isinstance(v, str) for v in c.values()), "classes", "names must be strings")
    w = m["windows"]
    need(isinstance(w, list) and len(w) >= 1, "windows", "must be a non-empty list")
    for i, win in enumerate(w):
        need(isinstance(win, dict) and isinstance(win.get("name"), str), f"windows[{i}]", "needs a name")
        sub = win.get("sub_windows")
        need(isinstance(sub, list) and len(sub) >= 1, f"windows[{i}].sub_windows", "must be a non-empty list")
        for pair in sub:
            need(isinstance(pair, list) and len(pair) == 2 and all(_is_number(x) for x in pair) and pair[0] > 0,
                 f"windows[{i}].sub_windows", "each must be [width > 0, level]")
    size, stride = m["input_size"], m["stride"]
    need(_is_int(stride) and 1 <= stride <= 1024, "stride", f"must be an integer 1..1024, not {str(stride)[:20]}")
    need(isinstance(size, list) and len(size) == 2 and all(_is_int(x) and 1 <= x <= 8192 for x in size),
         "input_size", "must be [height, width], integers 1..8192")
    need(size[0] % stride == 0 and size[1] % stride == 0, "input_size",
         f"{size[0]}x{size[1]} is not a multiple of the stride {stride}")
    for f in ("position_encoding", "selection", "created"):
        need(isinstance(m[f], str), f, f"must be a string, not {_kind(m[f])}")
    sampling = m["sampling"]
    need(isinstance(sampling, dict), "sampling", f"must be an object, not {_kind(sampling)}")
    for f in ("every", "max"):
        need(_is_int(sampling.get(f)) and sampling[f] >= 1, f"sampling.{f}", "must be an integer >= 1")
    prop = m["propagation"]
    need(isinstance(prop, dict), "propagation", f"must be an object, not {_kind(prop)}")
    known = [f.name for f in dataclasses.fields(PropagationConfig)]
    for key in prop:  # a misspelt setting would otherwise be dropped without a word
        need(key in known, f"propagation.{str(key)[:80]}", f"unknown setting (known: {', '.join(known)})")
    for f in dataclasses.fields(PropagationConfig):
        if f.name not in prop:
            continue
        v, default, field = prop[f.name], f.default, f"propagation.{f.name}"
        if isinstance(default, bool):
            need(isinstance(v, bool), field, "must be true or false")
        elif isinstance(default, int):
            low = 1 if f.name in _POSITIVE_PROPAGATION else 0
            need(_is_int(v) and v >= low, field, f"must be an integer >= {low}")
        elif isinstance(default, float):
            need(_is_number(v), field, "must be a number")
        elif isinstance(default, str):
            need(isinstance(v, str), field, "must be a string")
    files = m["files"]
    need(isinstance(files, dict), "files", f"must be an object (relative path -> sha256), not {_kind(files)}")
    for rel, digest in files.items():
        need(_safe_relative(rel), f"files[{rel[:80]!r}]",
             "must be a plain relative path inside the bundle (no absolute path, no '..')")
        need(isinstance(digest, str) and len(digest) == 64 and set(digest) <= _HEX, f"files[{rel!r}]",
             "must be a lower-case sha256 hex digest")
    weights = m.get("weights", {})
    need(isinstance(weights, dict) and all(isinstance(v, str) for v in weights.values()), "weights",
         "must be an object (name -> file)")
    for name, g in m["graphs"].items():
        for key in GRAPH_FILE_KEYS:
            if key in g:
                need(isinstance(g[key], str), f"graphs.{name}.{key}", "must be a file name")
        for key in ("inputs", "outputs"):
            io = g[key]
            need(isinstance(io, list) and len(io) >= 1, f"graphs.{name}.{key}", "must be a non-empty list")
            for j, t in enumerate(io):
                need(isinstance(t, dict) and isinstance(t.get("name"), str), f"graphs.{name}.{key}[{j}]",
                     "needs a name")
                need(isinstance(t.get("shape"), list)
                     and all(isinstance(d, str) or (_is_int(d) and d >= 1) for d in t["shape"]),
                     f"graphs.{name}.{key}[{j}].shape", "must be a list of sizes >= 1 or axis names")
    image = next((t for t in m["graphs"]["reference"]["inputs"] if t["name"] == "image"), None)
    if image is not None and len(image["shape"]) == 4 and _is_int(image["shape"][1]):
        need(image["shape"][1] == len(w), "windows",
             f"{len(w)} windows for a reference graph of {image['shape'][1]} input channels")


def _safe_relative(rel) -> bool:
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel or rel.startswith("/"):
        return False
    parts = rel.split("/")
    return all(p not in ("", ".", "..") for p in parts) and rel != "manifest.json"


def _inside(path: Path, root: Path, rel: str) -> Path:
    """``rel`` as a regular file inside the bundle (links resolved, and must stay inside)."""
    f = path / rel
    if not f.exists() and not f.is_symlink():
        raise BundleError(path, f"file {rel} is missing")
    real = Path(os.path.realpath(f))
    if real != root and root not in real.parents:
        raise BundleError(path, f"file {rel} leads outside the bundle (a link to {real})")
    try:
        st = os.stat(real)
    except OSError as exc:
        raise BundleError(path, f"file {rel} cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(path, f"file {rel} is not a regular file")
    return real


def _read_inside(path: Path, root: Path, rel: str, limit: int) -> bytes:
    real = _inside(path, root, rel)
    try:
        with open(real, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise BundleError(path, f"file {rel} cannot be read ({exc.strerror})") from None
    if len(data) > limit:
        raise BundleError(path, f"file {rel} is larger than {limit >> 20} MiB")
    return data


def _hash_inside(path: Path, root: Path, rel: str) -> str:
    real = _inside(path, root, rel)
    h, total = hashlib.sha256(), 0
    try:
        with open(real, "rb") as f:
            while block := f.read(1 << 20):
                total += len(block)
                if total > MAX_FILE_BYTES:
                    raise BundleError(path, f"file {rel} is larger than {MAX_FILE_BYTES >> 20} MiB")
                h.update(block)
    except OSError as exc:
        raise BundleError(path, f"file {rel} cannot be read ({exc.strerror})") from None
    return h.hexdigest()


# ---------------------------------------------------------------------------------------
# ONNX graphs, read as protobuf without the onnx package: the names of the graph's inputs and
# outputs, and whether any tensor keeps its data outside the file (external data).


class _NotProtobuf(ValueError):
    pass


def _varint(buf: memoryview, i: int, end: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= end or shift > 63:
            raise _NotProtobuf("bad varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf: memoryview, start: int, end: int):
    """(field number, wire type, value: int for varints, (start, end) for bytes) of one message."""
    i = start
    while i < end:
        tag, i = _varint(buf, i, end)
        field, wire = tag >> 3, tag & 7
        if field == 0:
            raise _NotProtobuf("field number 0")
        if wire == 0:
            value, i = _varint(buf, i, end)
        elif wire == 1:
            value, i = None, i + 8
        elif wire == 5:
            value, i = None, i + 4
        elif wire == 2:
            n, i = _varint(buf, i, end)
            value, i = (i, i + n), i + n
        else:
            raise _NotProtobuf(f"wire type {wire}")
        if i > end:
            raise _NotProtobuf("field runs past its message")
        yield field, wire, value


# message -> {field: sub-message kind} for every path that can hold a tensor
_MESSAGES = {
    "model": {7: "graph", 25: "function", 20: "training"},
    "training": {1: "graph", 2: "graph"},
    "function": {7: "node"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}


def _external_tensor(buf: memoryview, span: tuple[int, int]) -> bool:
    for field, wire, value in _fields(buf, *span):
        if (field == 14 and wire == 0 and value == 1) or (field == 13 and wire == 2):
            return True
    return False


def _scan(buf: memoryview, span: tuple[int, int], kind: str, depth: int = 0) -> bool:
    """True when a tensor anywhere under this message uses external data."""
    if depth > 32:
        raise _NotProtobuf("nested too deeply")
    subs = _MESSAGES.get(kind, {})
    for field, wire, value in _fields(buf, *span):
        sub = subs.get(field)
        if sub is None or wire != 2:
            continue
        if sub == "tensor":
            if _external_tensor(buf, value):
                return True
        elif _scan(buf, value, sub, depth + 1):
            return True
    return False


def onnx_io_names(data: bytes) -> tuple[list[str], list[str], bool]:
    """(input names without initializers, output names, uses external data) of an ONNX model;
    ValueError when the bytes are not an ONNX model."""
    buf = memoryview(data)
    graph, has_ir = None, False
    for field, wire, value in _fields(buf, 0, len(buf)):
        if field == 1 and wire == 0:
            has_ir = True
        elif field == 7 and wire == 2:
            graph = value
    if graph is None or not has_ir:
        raise _NotProtobuf("no graph")
    inputs, outputs, initializers = [], [], set()

    def name_of(span) -> str:
        for f, w, v in _fields(buf, *span):
            if f in (1, 8) and w == 2:  # ValueInfoProto.name = 1; TensorProto.name = 8
                return bytes(buf[v[0] : v[1]]).decode("utf-8", "replace")
        return ""

    for field, wire, value in _fields(buf, *graph):
        if wire != 2:
            continue
        if field == 11:
            inputs.append(name_of(value))
        elif field == 12:
            outputs.append(name_of(value))
        elif field == 5:
            for f, w, v in _fields(buf, *value):
                if f == 8 and w == 2:
                    initializers.add(bytes(buf[v[0] : v[1]]).decode("utf-8", "replace"))
    external = _scan(buf, (0, len(buf)), "model")
    return [n for n in inputs if n not in initializers], outputs, external


def _check_graph_io(path: Path, rel: str, name: str, g: dict, data: bytes) -> None:
    try:
        inputs, outputs, external = onnx_io_names(data)
    except ValueError:
        raise BundleError(path, f"graph {name!r} file {rel} is not an ONNX model") from None
    if external:
        raise BundleError(path, f"graph {name!r} file {rel} keeps weights in external data files; "
                                "a bundle's graphs must hold their weights")
    want_in = sorted(t["name"] for t in g["inputs"])
    want_out = sorted(t["name"] for t in g["outputs"])
    if sorted(inputs) != want_in or sorted(outputs) != want_out:
        raise BundleError(path, f"graph {name!r} file {rel} has inputs {sorted(inputs)} and outputs "
                                f"{sorted(outputs)}; the manifest says {want_in} and {want_out}")
