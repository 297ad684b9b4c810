"""CT and label I/O with exact geometry.

I/O contract
------------
``read_ct(path)`` returns ``(array, props)``:

* ``array`` is a numpy array in the project's one **canonical axial orientation**, axis
  order ``(z, y, x)``: ``x`` increases toward the patient's Left, ``y`` toward Posterior,
  ``z`` toward Superior. This is ITK's identity direction ("LPS"), so an axial slice
  ``array[z]`` shows the patient in the radiological convention (anterior at the top,
  the patient's right on the image's left). Slices are never resampled: the canonical
  array is the file's voxels permuted and flipped, nothing more.
* ``props`` (:class:`CTProperties`) records the file's own grid (size, spacing, origin,
  direction, pixel type) and the permutation and flips that map it to the canonical
  array, plus the canonical spacing ``spacing_zyx`` in mm.

``write_labels(labels, props, out_path)`` undoes the permutation and flips and writes a
uint8 image whose size, spacing, origin and direction equal the input's exactly (checked;
a mismatch raises :class:`GeometryError`). It writes to a temporary name in the output
folder and renames it into place, so no reader ever sees half a file.

Oblique direction matrices are processed with the nearest axis-aligned permutation
(the one maximising the summed |cosines|) and the original direction is restored exactly
on write: the grid of the output is the grid of the input, voxel for voxel.

Non-finite voxels (NaN, +-inf) in float images are replaced by -1024 HU (air) and counted
in ``props.nonfinite``; a volume where more than half the voxels are non-finite is
rejected as unusable.
"""
from __future__ import annotations

import itertools
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import GeometryError, InputError

AIR_HU = -1024.0
CT_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")


@dataclass(frozen=True)
class CTProperties:
    """What is needed to map a canonical array back onto the file's own grid."""

    path: str
    size: tuple[int, int, int]  # ITK order (i, j, k)
    spacing: tuple[float, float, float]  # ITK order
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # 9 values, row-major, as ITK gives them
    pixel_type: str
    # canonical numpy axis a (0=z, 1=y, 2=x) comes from file numpy axis src_axes[a]
    src_axes: tuple[int, int, int]
    flips: tuple[bool, bool, bool]  # flip canonical axis a after the transpose
    oblique: bool = False
    nonfinite: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        file_shape = self.size[::-1]
        return tuple(int(file_shape[a]) for a in self.src_axes)  # type: ignore[return-value]

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        file_spacing = self.spacing[::-1]
        return tuple(float(file_spacing[a]) for a in self.src_axes)  # type: ignore[return-value]

    def to_json(self) -> dict:
        d = asdict(self)
        d["shape_zyx"] = list(self.shape_zyx)
        d["spacing_zyx"] = list(self.spacing_zyx)
        return d


def nearest_axis_permutation(direction: np.ndarray) -> tuple[list[int], list[int], bool]:
    """For a 3x3 direction (columns = world direction of each index axis), return
    ``world_of_index`` (world axis each index axis runs along), the sign of each, and
    whether the matrix is oblique (not a signed permutation)."""
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    best, best_score = None, -1.0
    for perm in itertools.permutations(range(3)):
        score = sum(abs(d[perm[i], i]) for i in range(3))
        if score > best_score + 1e-12:
            best, best_score = perm, score
    assert best is not None
    world_of_index = list(best)
    signs = [1 if d[world_of_index[i], i] >= 0 else -1 for i in range(3)]
    oblique = not np.allclose(np.abs(d), np.abs(np.round(d)), atol=1e-6) or not all(
        abs(abs(d[world_of_index[i], i]) - 1.0) < 1e-6 for i in range(3)
    )
    return world_of_index, signs, oblique


def _canonical_mapping(direction) -> tuple[tuple[int, int, int], tuple[bool, bool, bool], bool]:
    world_of_index, signs, oblique = nearest_axis_permutation(direction)
    index_of_world = {w: i for i, w in enumerate(world_of_index)}
    src_axes, flips = [], []
    for a in range(3):  # canonical numpy axis a <-> world axis 2 - a (z, y, x)
        i = index_of_world[2 - a]  # ITK index axis that runs along this world axis
        src_axes.append(2 - i)  # numpy axis of the file array
        flips.append(signs[i] < 0)
    return tuple(src_axes), tuple(flips), oblique  # type: ignore[return-value]


def to_canonical(array: np.ndarray, props: CTProperties) -> np.ndarray:
    out = np.transpose(array, props.src_axes)
    for a, f in enumerate(props.flips):
        if f:
            out = np.flip(out, axis=a)
    return np.ascontiguousarray(out)


def from_canonical(array: np.ndarray, props: CTProperties) -> np.ndarray:
    out = array
    for a, f in enumerate(props.flips):
        if f:
            out = np.flip(out, axis=a)
    inverse = np.argsort(props.src_axes)
    return np.ascontiguousarray(np.transpose(out, inverse))


MAX_VOXELS = 2**31  # 2 G voxels: eight times a 512 x 512 x 1000 CT
DEFLATE_MAX_RATIO = 1032  # deflate never expands its input more than this: a bound for .gz / compressed .mha


def _itk_reason(exc: RuntimeError) -> str:
    """ITK's own reason, whole, without the source location and object address."""
    text = " ".join(str(exc).split())
    if "ITK ERROR:" in text:
        text = text.split("ITK ERROR:", 1)[1]
        head, sep, rest = text.partition("): ")
        text = rest if sep and "(0x" in head else text
    elif ": " in text and "Exception thrown" in text:
        text = text.split(": ", 1)[1]
    return text.strip()[:200] or "ITK read error"


def _open_image(path: Path) -> sitk.ImageFileReader:
    """A reader with the header read (no voxels allocated yet)."""
    if not path.exists():
        raise InputError(path, "file does not exist")
    if path.is_dir():
        raise InputError(path, "is a folder, not an image file")
    if not path.is_file():
        raise InputError(path, "is not a regular file")
    if path.stat().st_size == 0:
        raise InputError(path, "file is empty")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(path, f"unreadable or truncated image ({_itk_reason(exc)})") from None
    return reader


def _check_header(path: Path, reader: sitk.ImageFileReader) -> None:
    """Dimensions, components, spacing and the voxel count, before any voxel is allocated."""
    dim = reader.GetDimension()
    if dim == 2:
        raise InputError(path, "is a 2D image; a 3D CT volume is required")
    if dim != 3:
        raise InputError(path, f"is a {dim}D image; a 3D CT volume is required")
    if reader.GetNumberOfComponents() != 1:
        raise InputError(path, f"has {reader.GetNumberOfComponents()} components per voxel; a scalar CT is required")
    size = reader.GetSize()
    if any(s == 0 for s in size):
        raise InputError(path, f"has a zero-size axis {size}")
    if any((not np.isfinite(s)) or s <= 0 for s in reader.GetSpacing()):
        raise InputError(path, f"has invalid spacing {reader.GetSpacing()} (every spacing must be positive)")
    if not all(np.isfinite(v) for v in (*reader.GetOrigin(), *reader.GetDirection())):
        raise InputError(path, "has a non-finite origin or direction")
    voxels = int(np.prod([int(s) for s in size]))
    if voxels > MAX_VOXELS:
        raise InputError(path, f"header claims {'x'.join(map(str, size))} voxels, more than the {MAX_VOXELS} "
                               "this appliance reads")


def _nifti_header(raw: bytes) -> tuple[int, int] | None:
    """(voxel offset, voxel bytes) from a NIfTI-1 or NIfTI-2 header; None if not NIfTI."""
    import struct

    for endian in "<>":
        if len(raw) >= 348 and struct.unpack(endian + "i", raw[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", raw[40:56])
            bitpix = struct.unpack(endian + "h", raw[72:74])[0]
            offset = struct.unpack(endian + "f", raw[108:112])[0]
            break
        if len(raw) >= 540 and struct.unpack(endian + "i", raw[:4])[0] == 540:
            dims = struct.unpack(endian + "8q", raw[16:80])
            bitpix = struct.unpack(endian + "h", raw[14:16])[0]
            offset = struct.unpack(endian + "q", raw[168:176])[0]
            break
    else:
        return None
    n = max(1, min(int(dims[0]), 7))
    count = int(np.prod([max(1, int(d)) for d in dims[1 : n + 1]], dtype=object))
    if not np.isfinite(offset) or bitpix <= 0:
        return None
    return max(int(offset), 348), count * int(bitpix) // 8


def _meta_header(path: Path) -> dict[str, str]:
    """The key = value lines of a MetaImage header, up to ElementDataFile (its end offset
    under the key ``_data_offset``)."""
    fields: dict[str, str] = {}
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    pos = 0
    for line in head.split(b"\n"):
        pos += len(line) + 1
        key, sep, value = line.decode("latin-1").partition("=")
        if not sep:
            continue
        fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            fields["_data_offset"] = str(pos)
            break
    return fields


def _check_size(path: Path, reader: sitk.ImageFileReader) -> None:
    """The file must hold the voxel bytes its header claims (compressed: could hold them),
    checked against the file's size before anything is allocated."""
    name = path.name.lower()
    size = path.stat().st_size
    truncated = "unreadable or truncated image (the header claims %d voxel bytes; the file holds %d)"
    if name.endswith(".nii"):
        with open(path, "rb") as f:
            hdr = _nifti_header(f.read(540))
        if hdr is not None and size < hdr[0] + hdr[1]:
            raise InputError(path, truncated % (hdr[1], max(0, size - hdr[0])))
    elif name.endswith(".nii.gz"):
        import gzip
        import struct
        import zlib

        try:
            with gzip.open(path, "rb") as g:
                hdr = _nifti_header(g.read(540))
        except (OSError, EOFError, zlib.error) as exc:
            raise InputError(path, f"unreadable or truncated image ({exc})") from None
        if hdr is None:
            return
        need = hdr[0] + hdr[1]
        if need > DEFLATE_MAX_RATIO * size + 4096:
            raise InputError(path, f"unreadable or truncated image (the header claims {hdr[1]} voxel bytes; "
                                   f"{size} compressed bytes cannot hold them)")
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            isize = struct.unpack("<I", f.read(4))[0]
        if need % 2**32 != isize:  # the gzip trailer: uncompressed size mod 2**32
            raise InputError(path, "unreadable or truncated image (gzip stream shorter than the header says)")
    elif name.endswith((".mha", ".mhd")):
        meta = _meta_header(path)
        need = _voxel_bytes(reader)
        where = meta.get("ElementDataFile", "LOCAL")
        if where == "LOCAL":
            data_bytes = size - int(meta.get("_data_offset", size))
        else:
            data = (path.parent / where) if not os.path.isabs(where) else Path(where)
            if not data.is_file():
                raise InputError(path, f"its data file {where} is not a regular file")
            data_bytes = data.stat().st_size
        if meta.get("CompressedData", "False").lower() == "true":
            stated = meta.get("CompressedDataSize", "")
            if stated.isdigit() and data_bytes < int(stated):
                raise InputError(path, f"unreadable or truncated image (the header claims {stated} compressed "
                                       f"bytes; the file holds {max(0, data_bytes)})")
            if need > DEFLATE_MAX_RATIO * data_bytes + 4096:
                raise InputError(path, f"unreadable or truncated image (the header claims {need} voxel bytes; "
                                       f"{data_bytes} compressed bytes cannot hold them)")
        elif data_bytes < need:
            raise InputError(path, truncated % (need, max(0, data_bytes)))
    elif name.endswith(".nrrd"):
        _check_nrrd(path, reader, truncated)


def _check_nrrd(path: Path, reader: sitk.ImageFileReader, truncated: str) -> None:
    """NRRD: the header ends at the first blank line; raw data must be whole, gzip data must
    be able to hold the voxels, a detached data file must be a regular file."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    end = head.find(b"\n\n")
    if end < 0:
        return  # ITK has read the header already; nothing we can measure
    fields = {}
    for line in head[:end].decode("latin-1").splitlines()[1:]:
        key, sep, value = line.partition(":")
        if sep and not line.startswith("#"):
            fields[key.strip().lower()] = value.strip().lstrip("=").strip()
    need = _voxel_bytes(reader)
    where = fields.get("data file") or fields.get("datafile")
    if where:
        data = (path.parent / where) if not os.path.isabs(where) else Path(where)
        if not data.is_file():
            raise InputError(path, f"its data file {where} is not a regular file")
        data_bytes = data.stat().st_size
    else:
        data_bytes = path.stat().st_size - (end + 2)
    if fields.get("encoding", "raw").lower() in ("gzip", "gz", "bzip2", "bz2"):
        if need > DEFLATE_MAX_RATIO * data_bytes + 4096:
            raise InputError(path, f"unreadable or truncated image (the header claims {need} voxel bytes; "
                                   f"{data_bytes} compressed bytes cannot hold them)")
    elif fields.get("encoding", "raw").lower() == "raw" and data_bytes < need:
        raise InputError(path, truncated % (need, max(0, data_bytes)))


def _voxel_bytes(reader: sitk.ImageFileReader) -> int:
    one = sitk.Image([1] * reader.GetDimension(), reader.GetPixelID(), reader.GetNumberOfComponents())
    count = int(np.prod([int(s) for s in reader.GetSize()]))
    return count * reader.GetNumberOfComponents() * one.GetSizeOfPixelComponent()


def read_image(path: str | os.PathLike) -> sitk.Image:
    """A 3D scalar image, header first (dimensions, spacing, voxel count against the file's
    size), then the voxels: every problem an InputError naming the file."""
    path = Path(path)
    reader = _open_image(path)
    _check_header(path, reader)
    _check_size(path, reader)
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise InputError(path, f"unreadable or truncated image ({_itk_reason(exc)})") from None


def read_ct(path: str | os.PathLike, *, label: bool = False) -> tuple[np.ndarray, CTProperties]:
    """Read a 3D CT (or, with ``label=True``, a label map) into the canonical orientation."""
    path = Path(path)
    img = read_image(path)
    src_axes, flips, oblique = _canonical_mapping(img.GetDirection())
    array = sitk.GetArrayFromImage(img)
    nonfinite = 0
    if label:
        if np.issubdtype(array.dtype, np.floating):
            if not np.all(np.isfinite(array)):
                raise InputError(path, "label map has non-finite values")
            if not np.all(array == np.round(array)):
                raise InputError(path, "label map has non-integer values")
        lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
        if lo < 0 or hi > 255:
            raise InputError(path, f"label values {lo}..{hi} do not fit the FLARE22 range 0..13")
        array = array.astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        finite = np.isfinite(array)
        nonfinite = int(array.size - np.count_nonzero(finite))
        if nonfinite:
            if nonfinite * 2 > array.size:
                raise InputError(path, f"{nonfinite} of {array.size} voxels are NaN or infinite")
            array = np.where(finite, array, AIR_HU).astype(np.float32)
        else:
            array = array.astype(np.float32, copy=False)
    props = CTProperties(
        path=str(path),
        size=tuple(int(s) for s in img.GetSize()),
        spacing=tuple(float(s) for s in img.GetSpacing()),
        origin=tuple(float(s) for s in img.GetOrigin()),
        direction=tuple(float(s) for s in img.GetDirection()),
        pixel_type=img.GetPixelIDTypeAsString(),
        src_axes=src_axes,
        flips=flips,
        oblique=oblique,
        nonfinite=nonfinite,
    )
    return to_canonical(np.asarray(array), props), props


def read_label_like(path: str | os.PathLike, ref: CTProperties) -> np.ndarray:
    """Read a label map that must lie on the grid of the CT described by ``ref``."""
    labels, props = read_label(path)
    check_same_grid(props, ref, what=f"label {path}")
    return labels


def read_label(path: str | os.PathLike) -> tuple[np.ndarray, CTProperties]:
    return read_ct(path, label=True)


def check_same_grid(a: CTProperties, b: CTProperties, *, what: str, tol: float = 1e-4) -> None:
    """Raise GeometryError unless two files share size, spacing, origin and direction."""
    problems = []
    if a.size != b.size:
        problems.append(f"size {a.size} != {b.size}")
    for name in ("spacing", "origin", "direction"):
        va, vb = np.asarray(getattr(a, name)), np.asarray(getattr(b, name))
        if not np.allclose(va, vb, atol=tol, rtol=0):
            problems.append(f"{name} {tuple(np.round(va, 4))} != {tuple(np.round(vb, 4))}")
    if problems:
        raise GeometryError(f"{what} is not on the grid of {b.path}: " + "; ".join(problems))


def labels_to_image(labels: np.ndarray, props: CTProperties) -> sitk.Image:
    labels = np.asarray(labels)
    if labels.shape != props.shape_zyx:
        raise GeometryError(
            f"prediction for {props.path} has shape {labels.shape}, expected {props.shape_zyx} (z, y, x)"
        )
    if labels.dtype != np.uint8:
        if labels.size and (labels.min() < 0 or labels.max() > 255):
            raise GeometryError(f"prediction for {props.path} has labels outside 0..255")
        labels = labels.astype(np.uint8)
    img = sitk.GetImageFromArray(from_canonical(labels, props))
    img.SetSpacing(props.spacing)
    img.SetOrigin(props.origin)
    img.SetDirection(props.direction)
    if tuple(img.GetSize()) != tuple(props.size):
        raise GeometryError(f"{props.path}: output size {img.GetSize()} != input size {props.size}")
    return img


OUTPUT_MODE = 0o644  # every output (labels, maps, reports) readable by whoever reads the outputs


def atomic_write_image(img: sitk.Image, out_path: str | os.PathLike, *, compress: bool = True,
                       tmp_dir: str | os.PathLike | None = None) -> Path:
    """Write an image under a temporary name and rename it into place (a reader never sees
    half a file; an existing file or link at ``out_path`` is replaced, never written through).

    The temporary lies in ``tmp_dir`` (a private folder of the caller on the same file
    system) or else in a fresh private folder made beside ``out_path``: nobody else can
    plant a link under its name."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(out_path.suffixes[-2:]) if out_path.name.endswith(".nii.gz") else out_path.suffix
    own_dir = None if tmp_dir is not None else tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.parent)
    fd, tmp = tempfile.mkstemp(prefix="part.", suffix=suffix, dir=tmp_dir if tmp_dir is not None else own_dir)
    os.close(fd)
    try:
        sitk.WriteImage(img, tmp, useCompression=compress)
        os.chmod(tmp, OUTPUT_MODE)  # mkstemp makes 0600
        os.replace(tmp, out_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        if own_dir is not None:
            os.rmdir(own_dir)
    return out_path


def write_labels(labels: np.ndarray, props: CTProperties, out_path: str | os.PathLike, *,
                 tmp_dir: str | os.PathLike | None = None) -> Path:
    """Write a canonical (z, y, x) label array onto exactly the input's grid, atomically."""
    img = labels_to_image(labels, props)
    for name, want in (("spacing", props.spacing), ("origin", props.origin), ("direction", props.direction)):
        got = getattr(img, f"Get{name.capitalize()}")()
        if tuple(got) != tuple(want):
            raise GeometryError(f"{props.path}: output {name} {got} != input {want}")
    return atomic_write_image(img, out_path, tmp_dir=tmp_dir)


def write_map(values: np.ndarray, props: CTProperties, out_path: str | os.PathLike, *,
              tmp_dir: str | os.PathLike | None = None) -> Path:
    """Write a canonical (z, y, x) map (e.g. uncertainty: uint8 stays uint8, anything else
    becomes float32) onto the input's grid."""
    values = np.asarray(values)
    if values.dtype != np.uint8:
        values = values.astype(np.float32)
    if values.shape != props.shape_zyx:
        raise GeometryError(f"map for {props.path} has shape {values.shape}, expected {props.shape_zyx}")
    img = sitk.GetImageFromArray(from_canonical(values, props))
    img.SetSpacing(props.spacing)
    img.SetOrigin(props.origin)
    img.SetDirection(props.direction)
    return atomic_write_image(img, out_path, tmp_dir=tmp_dir)


def case_name(path: str | os.PathLike) -> str:
    """``FLARETs_0001_0000.nii.gz`` -> ``FLARETs_0001``."""
    name = Path(path).name
    for suffix in CT_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name[:-5] if name.endswith("_0000") else name


def list_cases(folder: str | os.PathLike) -> list[Path]:
    """Every ``*_0000`` CT in a folder (``.nii.gz``, ``.nii``, ``.mha``), sorted."""
    folder = Path(folder)
    found = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if any(p.name.endswith("_0000" + s) for s in (".nii.gz", ".nii", ".mha")):
            found.append(p)
    return found
