"""FLARE22 accuracy scoring: per case and organ Dice (DSC) and normalised surface Dice (NSD).

Semantics follow the organisers' evaluation script (REFERENCE section 2):

- Organ ``i`` of a case is scored on the masks ``gt == i`` and ``pred == i``. Ground truth
  and prediction both empty: DSC = NSD = 1. Ground truth empty, prediction not: 0, 0.
  Ground truth present, prediction empty: 0, 0.
- NSD tolerances per organ: ``labels.NSD_TOLERANCE_MM``. Spacing is the ground truth's.
- Aorta, IVC and oesophagus (``labels.AXIAL_CROP_ORGANS``) are first cropped, both masks, to
  the axial slices that the ground truth's organ covers. The official script slices
  ``[z_min:z_max]`` and so leaves out the top labelled slice; ``official_crop_off_by_one=True``
  reproduces that, the default (False) keeps ``[z_min, z_max]`` inclusive. With the
  off-by-one crop, an organ whose ground truth lies on one slice only is cropped to nothing
  and, as in the official script, scores NaN (0 / 0); summary means skip NaN.
- A missing prediction file counts as an empty prediction (1 where the ground truth lacks
  the organ, 0 where it has it) and is flagged in the CSV's ``missing`` column.

Arrays are label volumes in SimpleITK's ``GetArrayFromImage`` axis order (z, y, x) with
spacing ``(sz, sy, sx)`` in mm. This module uses numpy, scipy and SimpleITK only.

NSD is the surfel-based surface Dice of Nikolov et al. (DeepMind ``surface-distance``),
implemented here from its definition: every 2 x 2 x 2 neighbourhood of voxels (a cube whose
corners are voxel centres) that is neither all inside nor all outside holds a piece of the
object's surface; its area comes from a 256-entry table indexed by the neighbourhood's
bit code, and its distance to the other surface from a Euclidean distance transform with the
voxel spacing on the same grid of cubes. A surface element counts as overlapping when that
distance is at most the tolerance; NSD = overlapping area of both surfaces / their total area.

CSV (wide, one row per case, values rounded to 4 decimals, ``nan`` where undefined)::

    case,1_liver_DSC,1_liver_NSD,2_right_kidney_DSC,...,13_left_kidney_NSD,missing

Means in the summary are over cases of the rounded per-case values (what one gets from the
CSV, as with the official script), per organ, and over all organs and cases together.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import functools
import itertools
import math
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from app.argtypes import existing_dir, positive_int
from app.ctio import read_image
from app.errors import InputError
from app.labels import AXIAL_CROP_ORGANS, NSD_TOLERANCE_MM, ORGANS

SUFFIX = ".nii.gz"
DECIMALS = 4
# Largest allowed difference between prediction and ground-truth header values (spacing and
# origin in mm, direction cosines): NIfTI keeps them as float32, so an exact test would trip
# on round-off between writers.
GEOMETRY_ATOL = 1e-4

Scores = dict[int, tuple[float, float]]


# ---------------------------------------------------------------------------------------
# Surface elements: the 256 neighbourhood codes and their areas
# ---------------------------------------------------------------------------------------
# Corner k of a 2 x 2 x 2 neighbourhood is the voxel at offset (dz, dy, dx) with
# k = 4 dz + 2 dy + dx; it sets bit k of the neighbourhood code.
_CORNERS: tuple[tuple[int, int, int], ...] = tuple(itertools.product((0, 1), repeat=3))
_ALL_INSIDE = 255


def _neighbours(corner: tuple[int, int, int]) -> Iterator[tuple[int, int, int]]:
    """The three corners that share a cube edge with ``corner``."""
    for axis in range(3):
        other = list(corner)
        other[axis] ^= 1
        yield tuple(other)


def _edge_connected_groups(corners: set[tuple[int, int, int]]) -> list[set[tuple[int, int, int]]]:
    groups, left = [], set(corners)
    while left:
        todo = [left.pop()]
        group = set(todo)
        while todo:
            for other in _neighbours(todo.pop()):
                if other in left:
                    left.remove(other)
                    group.add(other)
                    todo.append(other)
        groups.append(group)
    return groups


def _enclosing_polygon(group: set[tuple[int, int, int]]) -> np.ndarray:
    """The closed polygon (k x 3, unit cube) that separates ``group`` from the other corners.

    Its vertices are the midpoints of the cube edges with one end in the group; on each cube
    face the group has 0 or 2 such edges, which gives one side of the polygon per face.
    """
    sides = []
    for axis, level in itertools.product(range(3), (0, 1)):
        face = [c for c in _CORNERS if c[axis] == level]
        points = [
            tuple((a + b) / 2 for a, b in zip(inner, outer))
            for inner in face if inner in group
            for outer in _neighbours(inner) if outer in face and outer not in group
        ]
        if len(points) not in (0, 2):
            raise AssertionError(f"corner group {sorted(group)} crosses a face {len(points)} times")
        if points:
            sides.append(points)
    polygon = list(sides.pop())
    while sides:
        side = next(s for s in sides if polygon[-1] in s)
        sides.remove(side)
        following = side[1] if side[0] == polygon[-1] else side[0]
        if following != polygon[0]:
            polygon.append(following)
    return np.array(polygon, dtype=float)


def _triangulations(vertices: tuple[int, ...]) -> Iterator[list[tuple[int, int, int]]]:
    """Every triangulation of the polygon ``vertices`` (as vertex-index triples)."""
    if len(vertices) < 3:
        yield []
        return
    first, last = vertices[0], vertices[-1]
    for k in range(1, len(vertices) - 1):  # the triangle on the side (first, last)
        for left in _triangulations(vertices[: k + 1]):
            for right in _triangulations(vertices[k:]):
                yield left + right + [(first, vertices[k], last)]


def _area_vectors(code: int) -> np.ndarray:
    """Triangle area vectors (t x 3, unit spacing) of the surface in neighbourhood ``code``.

    The minority side (at most 4 corners; the inside at a tie) is split into edge-connected
    groups and each group is enclosed by its own polygon, so diagonal corners stay apart and
    a code and its complement get the same surface. A polygon is triangulated by the
    triangulation of largest area: for the two polygons that are not planar (around three
    corners of a face, and around a zig-zag of four corners) this is one planar quadrilateral
    plus ears. This reproduces the surfel areas of the DeepMind surface-distance table for all
    256 codes at any spacing (tests/test_scoring.py checks it).
    """
    inside = {c for k, c in enumerate(_CORNERS) if code >> k & 1}
    if len(inside) > 4:
        inside = set(_CORNERS) - inside
    vectors = []
    for group in _edge_connected_groups(inside):
        polygon = _enclosing_polygon(group)
        best, best_area = [], -1.0
        for triangles in _triangulations(tuple(range(len(polygon)))):
            tri_vectors = [
                np.cross(polygon[b] - polygon[a], polygon[c] - polygon[a]) / 2
                for a, b, c in triangles
            ]
            area = sum(float(np.linalg.norm(v)) for v in tri_vectors)
            if area > best_area + 1e-12:
                best, best_area = tri_vectors, area
        vectors.extend(best)
    return np.array(vectors, dtype=float).reshape(-1, 3)


@functools.lru_cache(maxsize=1)
def _unit_area_vectors() -> tuple[np.ndarray, ...]:
    return tuple(_area_vectors(code) for code in range(256))


@functools.lru_cache(maxsize=64)
def surfel_area_table(spacing_zyx: tuple[float, float, float]) -> np.ndarray:
    """Surface area in mm^2 inside each of the 256 neighbourhood codes, at this spacing.

    A triangle's area vector (a_z, a_y, a_x) on the unit cube is its area projected on the
    planes normal to z, y and x; the spacing scales these to
    (a_z sy sx, a_y sz sx, a_x sz sy), whose norm is the triangle's area in mm^2.
    """
    sz, sy, sx = (float(s) for s in spacing_zyx)
    scale = np.array([sy * sx, sz * sx, sz * sy])
    table = np.array([np.linalg.norm(v * scale, axis=1).sum() for v in _unit_area_vectors()])
    table.setflags(write=False)
    return table


def neighbour_codes(mask: np.ndarray) -> np.ndarray:
    """Bit codes of every 2 x 2 x 2 neighbourhood that touches ``mask`` (shape + 1 per axis).

    Entry (i, j, k) describes the voxels (i-1..i, j-1..j, k-1..k); voxels outside the array
    count as background, so surfaces close at the array's border.
    """
    padded = np.pad(mask.astype(np.uint8, copy=False), 1)
    n0, n1, n2 = (s + 1 for s in mask.shape)
    codes = np.zeros((n0, n1, n2), np.uint8)
    for bit, (dz, dy, dx) in enumerate(_CORNERS):
        codes |= padded[dz:dz + n0, dy:dy + n1, dx:dx + n2] << np.uint8(bit)
    return codes


# ---------------------------------------------------------------------------------------
# DSC and NSD of two binary masks
# ---------------------------------------------------------------------------------------
def _bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Tight box around the nonzero voxels of ``mask``, or None when it has none."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hit.size == 0:
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def _distance_to_surface(
    surface: np.ndarray, spacing: tuple[float, ...], tolerance_mm: float
) -> np.ndarray:
    """Distance in mm from every grid point to the nearest True point of ``surface``.

    Exact within the box around ``surface`` widened by the tolerance (plus one voxel) on each
    axis; infinity outside it, where every point is farther than the tolerance anyway.
    """
    distance = np.full(surface.shape, np.inf)
    box = _bounding_box(surface)
    if box is None:
        return distance
    widened = tuple(
        slice(max(0, b.start - margin), min(n, b.stop + margin))
        for b, n, margin in zip(
            box, surface.shape, (math.ceil(tolerance_mm / s) + 1 for s in spacing)
        )
    )
    distance[widened] = ndimage.distance_transform_edt(~surface[widened], sampling=spacing)
    return distance


def surface_dice(
    gt: np.ndarray, pred: np.ndarray, spacing_zyx: Sequence[float], tolerance_mm: float
) -> float:
    """Normalised surface Dice of two boolean masks of equal shape; NaN when both are empty.

    The masks are cropped to the box around both (every surface element lies in it, so the
    distance transforms stay exact), then padded by one background voxel by
    ``neighbour_codes``.
    """
    if gt.shape != pred.shape or gt.ndim != 3:
        raise ValueError(f"masks must be 3-D and of one shape, got {gt.shape} and {pred.shape}")
    spacing = tuple(float(s) for s in spacing_zyx)
    box = _bounding_box(gt | pred)
    if box is None:
        return math.nan
    gt, pred = gt[box], pred[box]
    table = surfel_area_table(spacing)
    codes_gt, codes_pred = neighbour_codes(gt), neighbour_codes(pred)
    surface_gt = (codes_gt != 0) & (codes_gt != _ALL_INSIDE)
    surface_pred = (codes_pred != 0) & (codes_pred != _ALL_INSIDE)
    area_gt = table[codes_gt[surface_gt]]
    area_pred = table[codes_pred[surface_pred]]
    to_pred = _distance_to_surface(surface_pred, spacing, tolerance_mm)[surface_gt]
    to_gt = _distance_to_surface(surface_gt, spacing, tolerance_mm)[surface_pred]
    near_gt, near_pred = to_pred <= tolerance_mm, to_gt <= tolerance_mm
    overlap = area_gt[near_gt].sum() + area_pred[near_pred].sum()
    return float(overlap / (area_gt.sum() + area_pred.sum()))


def dice(gt: np.ndarray, pred: np.ndarray) -> float:
    """Volumetric Dice of two boolean masks; NaN when both are empty."""
    total = int(np.count_nonzero(gt)) + int(np.count_nonzero(pred))
    if total == 0:
        return math.nan
    return 2.0 * int(np.count_nonzero(gt & pred)) / total


# ---------------------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------------------
def _union(a: tuple[slice, ...] | None, b: tuple[slice, ...] | None) -> tuple[slice, ...]:
    if a is None or b is None:
        return a if b is None else b
    return tuple(slice(min(p.start, q.start), max(p.stop, q.stop)) for p, q in zip(a, b))


def score_case(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing_zyx: Sequence[float],
    *,
    official_crop_off_by_one: bool = False,
) -> Scores:
    """DSC and NSD of every FLARE22 organ: ``{organ id: (dsc, nsd)}``, unrounded.

    ``pred`` and ``gt`` are integer label volumes (z, y, x) of one shape, ``spacing_zyx`` the
    ground truth's spacing in mm. See the module docstring for the rules.
    """
    if pred.shape != gt.shape or gt.ndim != 3:
        raise ValueError(
            f"label volumes must be 3-D and of one shape, got {pred.shape} and {gt.shape}")
    if len(spacing_zyx) != 3 or not all(float(s) > 0 for s in spacing_zyx):
        raise ValueError(f"spacing must be three positive numbers (sz, sy, sx), got {spacing_zyx}")
    max_label = max(ORGANS)
    gt_boxes = ndimage.find_objects(np.asarray(gt), max_label=max_label)
    pred_boxes = ndimage.find_objects(np.asarray(pred), max_label=max_label)
    scores: Scores = {}
    for organ in ORGANS:
        gt_box, pred_box = gt_boxes[organ - 1], pred_boxes[organ - 1]
        if gt_box is None:
            scores[organ] = (1.0, 1.0) if pred_box is None else (0.0, 0.0)
            continue
        if pred_box is None:
            scores[organ] = (0.0, 0.0)
            continue
        box = _union(gt_box, pred_box)
        if organ in AXIAL_CROP_ORGANS:
            z_stop = gt_box[0].stop - 1 if official_crop_off_by_one else gt_box[0].stop
            box = (slice(gt_box[0].start, z_stop),) + box[1:]
        gt_mask, pred_mask = gt[box] == organ, pred[box] == organ
        scores[organ] = (
            dice(gt_mask, pred_mask),
            surface_dice(gt_mask, pred_mask, spacing_zyx, NSD_TOLERANCE_MM[organ]),
        )
    return scores


# ---------------------------------------------------------------------------------------
# Files and folders
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CaseScore:
    case: str
    scores: Scores
    missing: bool  # no prediction file: scored as an empty prediction


@dataclasses.dataclass(frozen=True)
class EvaluationSummary:
    cases: list[CaseScore]
    organ_means: dict[int, tuple[float, float]]  # over cases, NaN skipped
    mean_dsc: float  # over all organs and cases
    mean_nsd: float
    out_csv: Path
    extra_predictions: list[str]  # prediction files without a ground truth (not scored)
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (file, problem), keep_going only

    @property
    def missing(self) -> list[str]:
        return [c.case for c in self.cases if c.missing]

    def table(self) -> str:
        width = max(len(f"{i} {n}") for i, n in ORGANS.items()) + 2
        lines = [f"{'organ':<{width}}{'DSC':>8}{'NSD':>8}"]
        for organ, (d, n) in self.organ_means.items():
            lines.append(f"{f'{organ} {ORGANS[organ]}':<{width}}{d:>8.4f}{n:>8.4f}")
        lines.append(f"{'mean':<{width}}{self.mean_dsc:>8.4f}{self.mean_nsd:>8.4f}")
        lines.append(f"{len(self.cases)} cases, {len(self.missing)} missing predictions"
                     + (f": {', '.join(self.missing)}" if self.missing else ""))
        if self.extra_predictions:
            lines.append(f"{len(self.extra_predictions)} predictions without ground truth "
                         f"(not scored): {', '.join(self.extra_predictions)}")
        return "\n".join(lines)


def _read_labels(path: Path) -> sitk.Image:
    return read_image(path)  # 3-D, one channel, sizes checked before any allocation


def _label_array(image: sitk.Image, path: Path) -> np.ndarray:
    array = sitk.GetArrayFromImage(image)
    if array.dtype == np.uint8 and (not array.size or array.max() <= max(ORGANS)):
        return array
    if array.dtype.kind == "f":
        array = np.rint(array)
    if array.size and (array.min() < 0 or array.max() > max(ORGANS)):
        raise InputError(path, f"label values must lie in 0..{max(ORGANS)} (FLARE22 organs), "
                               f"found {array.min()}..{array.max()}")
    return array.astype(np.uint8)


def _check_same_grid(case: str, pred: sitk.Image, pred_path: Path, gt: sitk.Image) -> None:
    checks = (
        ("size", pred.GetSize(), gt.GetSize(), 0.0),
        ("spacing", pred.GetSpacing(), gt.GetSpacing(), GEOMETRY_ATOL),
        ("origin", pred.GetOrigin(), gt.GetOrigin(), GEOMETRY_ATOL),
        ("direction", pred.GetDirection(), gt.GetDirection(), GEOMETRY_ATOL),
    )
    for what, mine, theirs, atol in checks:
        if len(mine) != len(theirs) or not np.allclose(mine, theirs, rtol=0.0, atol=atol):
            raise InputError(pred_path, f"case {case}: prediction {what} {tuple(mine)} differs "
                                        f"from the ground truth's {tuple(theirs)}; the scorer "
                                        f"does not resample")


def score_files(
    case: str, pred_path: Path | None, gt_path: Path, *, official_crop_off_by_one: bool = False
) -> CaseScore:
    """Score one case from files; ``pred_path=None`` (or a path that does not exist) means
    the prediction is missing and counts as empty."""
    gt_image = _read_labels(gt_path)
    gt = _label_array(gt_image, gt_path)
    missing = pred_path is None or not Path(pred_path).is_file()
    if missing:
        pred = np.zeros_like(gt)
    else:
        pred_image = _read_labels(pred_path)
        _check_same_grid(case, pred_image, pred_path, gt_image)
        pred = _label_array(pred_image, pred_path)
    spacing_zyx = tuple(reversed(gt_image.GetSpacing()))
    scores = score_case(pred, gt, spacing_zyx, official_crop_off_by_one=official_crop_off_by_one)
    return CaseScore(case, scores, missing)


def _score_files_in_worker(
    case: str, pred_path: Path | None, gt_path: Path, official_crop_off_by_one: bool
) -> CaseScore | tuple[str, str]:
    # InputError does not survive pickling (its __init__ takes two arguments), so a worker
    # hands back (path, problem) and the parent raises it again.
    try:
        return score_files(case, pred_path, gt_path,
                           official_crop_off_by_one=official_crop_off_by_one)
    except InputError as err:
        return (err.path, err.problem)


def csv_columns() -> list[str]:
    columns = ["case"]
    for organ, name in ORGANS.items():
        columns += [f"{organ}_{name}_DSC", f"{organ}_{name}_NSD"]
    return columns + ["missing"]


def _rounded(value: float) -> float:
    return value if math.isnan(value) else round(value, DECIMALS)


def _write_csv(cases: list[CaseScore], out_csv: Path) -> None:
    """Write to a temporary name beside ``out_csv`` and rename, so no reader sees half a file."""
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    partial = out_csv.with_name(f".{out_csv.name}.partial")
    with open(partial, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(csv_columns())
        for c in cases:
            row = [c.case]
            for organ in ORGANS:
                row += [f"{_rounded(v):.{DECIMALS}f}" for v in c.scores[organ]]
            writer.writerow(row + [int(c.missing)])
    os.replace(partial, out_csv)


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def _case_name(path: Path) -> str:
    return path.name[: -len(SUFFIX)]


def default_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


def evaluate_folders(
    pred_dir: str | os.PathLike,
    gt_dir: str | os.PathLike,
    out_csv: str | os.PathLike,
    *,
    workers: int = 1,
    official_crop_off_by_one: bool = False,
    keep_going: bool = False,
) -> EvaluationSummary:
    """Score every ``<case>.nii.gz`` of ``gt_dir`` against the same name in ``pred_dir``.

    Cases run in ``workers`` processes (1: in this process). Writes the CSV (module
    docstring) and returns the summary. Raises InputError for an unreadable file or a
    prediction that is not on its ground truth's grid; with ``keep_going`` such cases are
    left out of the CSV and listed in ``summary.failed`` instead.
    """
    pred_dir, gt_dir, out_csv = Path(pred_dir), Path(gt_dir), Path(out_csv)
    for folder, role in ((gt_dir, "ground-truth"), (pred_dir, "prediction")):
        if not folder.is_dir():
            raise InputError(folder, f"{role} folder does not exist")
    gt_paths = sorted(p for p in gt_dir.iterdir() if p.name.endswith(SUFFIX) and p.is_file())
    if not gt_paths:
        raise InputError(gt_dir, f"no ground-truth files (*{SUFFIX})")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    gt_cases = {_case_name(p) for p in gt_paths}
    extra = sorted(_case_name(p) for p in pred_dir.iterdir()
                   if p.name.endswith(SUFFIX) and _case_name(p) not in gt_cases)
    jobs = []
    for gt_path in gt_paths:
        pred_path = pred_dir / gt_path.name
        jobs.append((_case_name(gt_path), pred_path if pred_path.is_file() else None, gt_path,
                     official_crop_off_by_one))

    if workers == 1 or len(jobs) == 1:
        results = [_score_files_in_worker(*job) for job in jobs]
    else:
        with concurrent.futures.ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            futures = [pool.submit(_score_files_in_worker, *job) for job in jobs]
            results = []
            for future in futures:
                results.append(future.result())
                if isinstance(results[-1], tuple) and not keep_going:  # an input error: stop early
                    for f in futures:
                        f.cancel()
                    break
    failed = [r for r in results if isinstance(r, tuple)]
    if failed and not keep_going:
        raise InputError(*failed[0])
    results = [r for r in results if not isinstance(r, tuple)]

    _write_csv(results, out_csv)
    organ_means = {}
    for organ in ORGANS:
        organ_means[organ] = tuple(
            _nanmean([_rounded(c.scores[organ][k]) for c in results]) for k in (0, 1)
        )
    everything = [[_rounded(c.scores[o][k]) for c in results for o in ORGANS] for k in (0, 1)]
    return EvaluationSummary(
        cases=results,
        organ_means=organ_means,
        mean_dsc=_nanmean(everything[0]),
        mean_nsd=_nanmean(everything[1]),
        out_csv=out_csv,
        extra_predictions=extra,
        failed=failed,
    )


# ---------------------------------------------------------------------------------------
# Command line: flare22 evaluate
# ---------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pred", type=existing_dir, required=True,
                        help="folder of predictions <case>.nii.gz")
    parser.add_argument("--gt", type=existing_dir, required=True,
                        help="folder of ground-truth label files <case>.nii.gz")
    parser.add_argument("--out", type=Path, required=True, help="CSV to write (one row per case)")
    parser.add_argument("--workers", type=positive_int, default=default_workers(),
                        help="cases scored in parallel processes (default: %(default)s)")
    parser.add_argument("--official-off-by-one", action="store_true",
                        help="crop aorta, IVC and oesophagus as the official script does, "
                             "leaving out the ground truth's top labelled slice")


def run(args: argparse.Namespace) -> int:
    """Exit 0: every case scored; 1: some cases could not be scored (one line each, the
    others in the CSV); 2: nothing could be scored (one line)."""
    try:
        summary = evaluate_folders(args.pred, args.gt, args.out, workers=args.workers,
                                   official_crop_off_by_one=args.official_off_by_one, keep_going=True)
    except (InputError, OSError) as err:
        print(f"flare22 evaluate: {err}", file=sys.stderr)
        return 2
    for path, problem in summary.failed:
        print(f"flare22 evaluate: {path}: {problem}", file=sys.stderr)
    if summary.cases:
        print(summary.table())
    print(f"wrote {summary.out_csv}" + (f" ({len(summary.failed)} cases not scored)" if summary.failed else ""))
    return 1 if summary.failed else 0
