"""Training data: FLARE-style folders, decoded once into a memory-mapped cache, served as
windowed axial slices at a configuration's input size.

Folders: labelled = ``images/<case>_0000.nii.gz`` + ``labels/<case>.nii.gz``; unlabelled =
``images/`` only. Volumes are read with the appliance's own reader (canonical orientation,
app.ctio) and windowed with the appliance's own windowing (app.windowing), so training and
inference see identical slices.

Cache: each decoded volume is stored once as ``<key>.img.npy`` (int16 Hounsfield units,
canonical z, y, x) and ``<key>.lab.npy`` (uint8) and memory-mapped afterwards. It lives in
``$FLARE22_CACHE`` or ``~/.cache/flare22`` (``cache_dir`` overrides); the key hashes the
file's absolute path, size and modification time, so an edited file is decoded again.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from app.ctio import case_name, check_same_grid, list_cases, read_ct
from app.errors import InputError
from app.labels import NUM_CLASSES
from app.resize import resize_labels_nearest
from app.windowing import DEFAULT_WINDOWS, model_slices

# Organs on few slices (the paper's main limitation): slices holding one are oversampled.
SMALL_ORGANS = (4, 7, 8, 9, 10, 12)


def default_cache_dir() -> Path:
    return Path(os.environ.get("FLARE22_CACHE", Path.home() / ".cache" / "flare22"))


@dataclass
class Volume:
    name: str
    image: np.ndarray  # (N, h, w) int16, memory-mapped
    labels: np.ndarray | None  # (N, h, w) uint8, memory-mapped
    spacing_zyx: tuple[float, float, float]


def _key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:20]


def load_volume(image_path: Path, label_path: Path | None, cache_dir: Path | None = None) -> Volume:
    cache_dir = Path(cache_dir or default_cache_dir())
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = _key(image_path) + (("-" + _key(label_path)) if label_path else "")
    img_f, lab_f, meta_f = (cache_dir / f"{key}.{s}" for s in ("img.npy", "lab.npy", "meta.npy"))
    if not (img_f.exists() and meta_f.exists() and (label_path is None or lab_f.exists())):
        arr, props = read_ct(image_path)
        arr = np.clip(np.round(arr), -32768, 32767).astype(np.int16)
        if label_path is not None:
            lab, lprops = read_ct(label_path, label=True)
            check_same_grid(lprops, props, what=f"label {label_path}")
            if lab.max() >= NUM_CLASSES:
                raise InputError(label_path, f"label values up to {lab.max()}; FLARE22 labels are 0..13")
            _atomic_save(lab_f, lab)
        _atomic_save(meta_f, np.asarray(props.spacing_zyx, np.float64))
        _atomic_save(img_f, arr)
    image = np.load(img_f, mmap_mode="r")
    labels = np.load(lab_f, mmap_mode="r") if label_path is not None else None
    spacing = tuple(float(s) for s in np.load(meta_f))
    return Volume(case_name(image_path), image, labels, spacing)  # type: ignore[arg-type]


def _atomic_save(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)


def scan_folder(root: str | os.PathLike, *, labelled: bool) -> list[tuple[Path, Path | None]]:
    """(image, label) paths of a FLARE-style folder; every problem names the case."""
    root = Path(root)
    images = root / "images"
    if not images.is_dir():
        raise InputError(root, "has no images/ folder (expected images/<case>_0000.nii.gz)")
    cases = list_cases(images)
    if not cases:
        raise InputError(images, "holds no *_0000.nii.gz cases")
    out = []
    if labelled:
        labels = root / "labels"
        if not labels.is_dir():
            raise InputError(root, "was given as labelled but has no labels/ folder (an unlabelled folder?)")
        for img in cases:
            name = case_name(img)
            lab = next((labels / f"{name}{s}" for s in (".nii.gz", ".nii", ".mha") if (labels / f"{name}{s}").exists()), None)
            if lab is None:
                raise InputError(img, f"has no label {labels / (name + '.nii.gz')}")
            out.append((img, lab))
    else:
        out = [(img, None) for img in cases]
    return out


def load_folder(root, *, labelled: bool, cache_dir=None) -> list[Volume]:
    return [load_volume(i, l, cache_dir) for i, l in scan_folder(root, labelled=labelled)]


# ---------------------------------------------------------------------------------------
# slices


def slice_inputs(vol: Volume, z: np.ndarray, size: int, windows=DEFAULT_WINDOWS) -> tuple[np.ndarray, np.ndarray]:
    """Windowed, resized slices (B, 3, size, size) and positions z / N (B,)."""
    z = np.asarray(z)
    img = model_slices(vol.image, z, windows, (size, size))
    return img.astype(np.float32), (z / vol.image.shape[0]).astype(np.float32)


def slice_labels(vol: Volume, z: np.ndarray, size: int) -> np.ndarray:
    return resize_labels_nearest(np.asarray(vol.labels[np.asarray(z)]), (size, size)).astype(np.int64)


@dataclass
class AugmentConfig:
    rotate_deg: float = 15.0
    scale: tuple[float, float] = (0.9, 1.1)
    intensity: float = 0.05  # +- shift and (1 +- x) scale of the windowed intensities
    flip: bool = False  # left/right flips swap the kidneys' and adrenals' sides: off by default
    p: float = 0.8


def augment(img: np.ndarray, lab: np.ndarray | None, rng: np.random.Generator, cfg: AugmentConfig):
    """Same random rotation/scale/flip for a (3, H, W) image and its (H, W) label."""
    if rng.random() > cfg.p:
        return img, lab
    h, w = img.shape[-2:]
    ang = np.deg2rad(rng.uniform(-cfg.rotate_deg, cfg.rotate_deg))
    s = rng.uniform(*cfg.scale)
    c, si = np.cos(ang) / s, np.sin(ang) / s
    mat = np.array([[c, -si], [si, c]])
    centre = np.array([(h - 1) / 2, (w - 1) / 2])
    offset = centre - mat @ centre
    img = np.stack([ndimage.affine_transform(ch, mat, offset, order=1, mode="nearest") for ch in img])
    if lab is not None:
        lab = ndimage.affine_transform(lab, mat, offset, order=0, mode="constant", cval=0)
    if cfg.flip and rng.random() < 0.5:
        img, lab = img[..., ::-1], (lab[..., ::-1] if lab is not None else None)
    if cfg.intensity:
        img = img * (1 + rng.uniform(-cfg.intensity, cfg.intensity)) + rng.uniform(-cfg.intensity, cfg.intensity)
        img = np.clip(img, 0, 1)
    return np.ascontiguousarray(img, dtype=np.float32), (np.ascontiguousarray(lab) if lab is not None else None)


def slice_weights(vols: list[Volume], small_boost: float = 3.0, small_organs=SMALL_ORGANS,
                  rule: str = "small") -> list[np.ndarray]:
    """Per-slice sampling weights against the class imbalance of axial slices.

    ``rule="small"``: 1, plus ``small_boost`` where one of ``small_organs`` is present
    (boost 3: a slice showing an adrenal gland, the gallbladder, the esophagus, the
    pancreas or the duodenum is drawn 4 times as often as one without).
    ``rule="rarity"``: 1 + small_boost * max over the organs present of r_o, where r_o is
    the inverse of the share of slices showing organ o, scaled so the rarest organ has 1:
    the rarer the rarest organ on a slice, the more often it is drawn."""
    present = [np.stack([np.bincount(np.asarray(v.labels[z]).ravel(), minlength=14)[1:14] > 0
                         for z in range(v.labels.shape[0])]) for v in vols]
    if rule == "small":
        cols = [o - 1 for o in small_organs]
        return [1.0 + small_boost * p[:, cols].any(axis=1) for p in present]
    if rule != "rarity":
        raise ValueError(f"slice weighting rule must be 'small' or 'rarity', got {rule!r}")
    share = np.concatenate(present).mean(axis=0)
    inv = np.where(share > 0, 1.0 / np.maximum(share, 1e-9), 0.0)
    r = inv / inv.max() if inv.max() > 0 else inv
    return [1.0 + small_boost * (p * r).max(axis=1) for p in present]


class SliceSampler:
    """Draws (volume, slice) pairs: volumes uniformly, slices by weight within a volume."""

    def __init__(self, vols: list[Volume], weights: list[np.ndarray] | None, seed: int):
        self.vols = vols
        self.p = [w / w.sum() for w in weights] if weights else None
        self.rng = np.random.default_rng(seed)

    def draw(self, n: int) -> list[tuple[int, int]]:
        out = []
        for _ in range(n):
            v = int(self.rng.integers(len(self.vols)))
            nz = self.vols[v].image.shape[0]
            z = int(self.rng.choice(nz, p=self.p[v])) if self.p else int(self.rng.integers(nz))
            out.append((v, z))
        return out

    def batch(self, n: int, size: int, aug: AugmentConfig | None, with_labels: bool):
        imgs, poss, labs = [], [], []
        for v, z in self.draw(n):
            vol = self.vols[v]
            img, pos = slice_inputs(vol, np.array([z]), size)
            lab = slice_labels(vol, np.array([z]), size)[0] if with_labels else None
            if aug is not None:
                img0, lab = augment(img[0], lab, self.rng, aug)
                img = img0[None]
            imgs.append(img[0])
            poss.append(pos[0])
            if with_labels:
                labs.append(lab)
        out = (np.stack(imgs), np.asarray(poss, np.float32))
        return out + ((np.stack(labs).astype(np.int64),) if with_labels else ())


# ---------------------------------------------------------------------------------------
# self-made masks and deformations (STCN pretraining on unlabelled slices)


def random_warp(shape: tuple[int, int], rng: np.random.Generator, *, rotate_deg: float = 15.0,
                scale: tuple[float, float] = (0.9, 1.1), shift: float = 0.06, shear: float = 0.05,
                elastic: float = 0.03, smooth: float = 0.12) -> np.ndarray:
    """Sampling coordinates (2, H, W) of a random affine map composed with a smooth elastic
    field: ``shift`` and ``elastic`` are fractions of the size, ``smooth`` the elastic field's
    Gaussian width as a fraction of the size."""
    h, w = shape
    ang = np.deg2rad(rng.uniform(-rotate_deg, rotate_deg))
    s = rng.uniform(*scale, size=2)
    sh = rng.uniform(-shear, shear)
    mat = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]]) @ np.array([[1, sh], [0, 1]]) / s[:, None]
    centre = np.array([(h - 1) / 2, (w - 1) / 2])
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    pts = np.stack([yy.ravel() - centre[0], xx.ravel() - centre[1]])
    coords = (mat @ pts).reshape(2, h, w) + (centre + rng.uniform(-shift, shift, 2) * np.array([h, w]))[:, None, None]
    if elastic > 0:
        for k, n in enumerate((h, w)):
            field = ndimage.gaussian_filter(rng.standard_normal((h, w)), smooth * n)
            field *= elastic * n / max(float(np.abs(field).max()), 1e-6)
            coords[k] += field
    return coords.astype(np.float32)


def warp(img: np.ndarray, lab: np.ndarray, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Resample a (C, H, W) image (linear) and an (H, W) label map (nearest) at ``coords``."""
    out = np.stack([ndimage.map_coordinates(c, coords, order=1, mode="nearest") for c in img])
    return out.astype(np.float32), ndimage.map_coordinates(lab, coords, order=0, mode="constant", cval=0)


def intensity_region(img: np.ndarray, rng: np.random.Generator, *, min_frac: float = 0.003,
                     max_frac: float = 0.2, tries: int = 12) -> np.ndarray | None:
    """A mask made from the image itself: the connected region of similar (smoothed)
    intensity around a random seed inside the body, cleaned by an opening; None when no
    region of a usable size was found."""
    g = ndimage.gaussian_filter(img.mean(axis=0), 1.5)
    h, w = g.shape
    body = g > np.percentile(g, 30)
    cand = np.argwhere(body)
    if not len(cand):
        return None
    for _ in range(tries):
        y, x = cand[rng.integers(len(cand))]
        delta = rng.uniform(0.03, 0.12)
        near = np.abs(g - g[y, x]) < delta
        near = ndimage.binary_opening(near, iterations=int(rng.integers(1, 3)))
        comp, _ = ndimage.label(near)
        if comp[y, x] == 0:
            continue
        m = ndimage.binary_fill_holes(comp == comp[y, x])
        if min_frac * h * w <= m.sum() <= max_frac * h * w:
            return m
    return None


def random_blob(shape: tuple[int, int], rng: np.random.Generator, *, min_frac: float = 0.005,
                max_frac: float = 0.1) -> np.ndarray:
    """A random smooth shape: a thresholded blurred noise field inside a random ellipse."""
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    while True:
        cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
        ry, rx = rng.uniform(0.04, 0.2) * h, rng.uniform(0.04, 0.2) * w
        ell = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        noise = ndimage.gaussian_filter(rng.standard_normal((h, w)), 0.04 * h)
        m = ell + 3 * noise / max(float(np.abs(noise).max()), 1e-6) < 1
        comp, n = ndimage.label(m)
        if n:
            m = comp == 1 + int(np.bincount(comp.ravel())[1:].argmax())
            if min_frac * h * w <= m.sum() <= max_frac * h * w:
                return m


def self_mask(img: np.ndarray, rng: np.random.Generator, p_region: float = 0.7) -> np.ndarray:
    """An image-made intensity region (probability ``p_region``) or else a random blob."""
    m = intensity_region(img, rng) if rng.random() < p_region else None
    return m if m is not None else random_blob(img.shape[-2:], rng)
