"""Synthetic abdomen CT phantoms with the 13 FLARE22 organ labels.

A case is drawn deterministically from one integer seed: the same seed gives the same
arrays, byte for byte, on the same machine and library versions. The anatomy is defined
in millimetres ("atlas" coordinates, below) and only then sampled on the voxel grid, so
a 64 x 64 x 48 case and a 512 x 512 x 200 case of the same seed show the same patient,
with the same organ volumes up to sampling.

Coordinates
-----------
Atlas coordinates are millimetres in the patient frame of ITK's identity direction (LPS):
``x`` toward the patient's Left, ``y`` toward Posterior, ``z`` toward Superior, origin at
the centre of the body's cross-section at the level of the renal hila (about L1/L2).
A per-case anisotropic scale (the patient's build) maps atlas millimetres to physical
millimetres: ``physical = centre + scale * atlas``.

Canonical output: direction identity, so the numpy array from ``GetArrayFromImage`` is
``(z, y, x)`` with the patient's right at small ``x``, anterior at small ``y`` and the
feet at small ``z``. With ``random_orientation=True`` the same voxels are written in one
of the 48 axis-aligned orientations (axis permutation and flips) with the matching
direction, origin and spacing, so the physical content is unchanged.

Grid
----
The physical field of view is drawn with the patient: the mid-abdomen fills 72-90 % of
the width of a square in-plane field of view of 307-512 mm, i.e. 0.6-1.0 mm pixels on a
512 x 512 grid; any other in-plane size samples the same field of view (64 x 64 gives
4.8-8 mm pixels). The axial coverage runs from the lung bases (heart, lower ribs) to the
iliac crests or below, 225-435 mm. A given slice count samples that coverage (200 slices:
1.1-2.2 mm); with ``shape_zyx[0] = None`` the slice spacing is drawn in 1.5-5 mm and the
slice count follows from it. An explicit ``spacing`` overrides all this (the anatomy stays
centred; a small field of view then crops it).

Intensities (HU) come from a contrast phase drawn per case (none to arterial-portal),
per-organ offsets, low-frequency texture, Gaussian noise (6-16 HU after smoothing,
correlated over about a pixel) and a partial-volume blur of about half a millimetre; they
are stored as int16. Labels are uint8, FLARE22 ids (``app.labels.ORGANS``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy.special import ndtri

from app.argtypes import nonneg_int, positive_int
from app.ctio import atomic_write_image
from app.labels import ORGANS

LIVER, R_KIDNEY, SPLEEN, PANCREAS, AORTA, IVC = 1, 2, 3, 4, 5, 6
R_ADRENAL, L_ADRENAL, GALLBLADDER, ESOPHAGUS, STOMACH, DUODENUM, L_KIDNEY = 7, 8, 9, 10, 11, 12, 13

FULL_INPLANE = 512  # the in-plane size at which the drawn pixel spacing is 0.6-1.0 mm
FOV_MM = (0.6 * FULL_INPLANE, 1.0 * FULL_INPLANE)
SLICE_MM = (1.5, 5.0)  # slice spacing drawn when the slice count is left to the seed
CHUNK_SLICES = 16  # slices rendered at a time (bounds the working memory)
AIR, FAT, MUSCLE, LUNG = -1000.0, -100.0, 50.0, -860.0
_NOISE_STREAM = 0x4E01  # per-slice noise generators: default_rng([seed, _NOISE_STREAM, z])
_ORIENT_STREAM = 0x0E1E  # orientation draw: independent of the anatomy
# Gaussian noise by table: the 256 mid-quantiles of N(0, 1), indexed by random bytes
# (about 7x faster than drawing normals; the in-plane smoothing blends the 256 levels).
_GAUSS_LUT = ndtri((np.arange(256) + 0.5) / 256).astype(np.float32)
_GAUSS_LUT /= _GAUSS_LUT.std()


# ----------------------------------------------------------------------------------------
# Smooth random fields and shapes (atlas millimetres)
# ----------------------------------------------------------------------------------------
class Field:
    """Smooth zero-mean random field of unit RMS: a sum of ``k`` separable products of
    cosines along z, y and x. Evaluating it on a box of 1-D coordinates is one tensor
    contraction, so it costs a few operations per voxel at any resolution."""

    def __init__(self, rng: np.random.Generator, wavelength: tuple[float, float], k: int = 6):
        self.omega = (2 * np.pi / rng.uniform(*wavelength, size=(3, k))).astype(np.float32)
        self.phase = rng.uniform(0, 2 * np.pi, size=(3, k)).astype(np.float32)
        self.k = k

    def __call__(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        fz, fy, fx = (
            np.cos(self.omega[a][:, None] * np.asarray(c, np.float32)[None, :] + self.phase[a][:, None])
            for a, c in enumerate((z, y, x))
        )
        scale = np.float32(2 * np.sqrt(2) / np.sqrt(self.k))  # each cosine has RMS 1/sqrt(2)
        # einsum's own loop, not BLAS: no worker threads, and the same sums in any box
        zy = (fz * scale)[:, :, None] * fy[:, None, :]
        return np.einsum("kzy,kx->zyx", zy, fx)


def _rotation(angles_deg) -> np.ndarray:
    """Rotation about z, then y, then x (degrees); returns R with local = R @ (p - c)."""
    az, ay, ax = np.deg2rad(angles_deg)
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    return (rz @ ry @ rx).T


class Ellipsoid:
    """Normalised radius of a rotated ellipsoid: < 1 inside."""

    def __init__(self, centre, semi, angles=(0.0, 0.0, 0.0)):
        self.c = np.asarray(centre, float)
        self.semi = np.asarray(semi, float)
        self.r = _rotation(angles)
        self.m = (self.r / self.semi[:, None]).astype(np.float32)  # local / semi = m @ (p - c)

    def bounds(self, grow: float) -> tuple[np.ndarray, np.ndarray]:
        half = np.abs(self.r.T) @ self.semi * grow
        return self.c - half, self.c + half

    def value(self, z, y, x) -> np.ndarray:
        d = [np.asarray(c, np.float32) - np.float32(self.c[i]) for i, c in enumerate((x, y, z))]
        acc = None
        for row in self.m:
            li = (row[0] * d[0])[None, None, :] + (row[1] * d[1])[None, :, None] + (row[2] * d[2])[:, None, None]
            acc = li * li if acc is None else acc + li * li
        return np.sqrt(acc)


class Tube:
    """A swept sphere along a polyline (x, y, z points, radius per point): distance to the
    centre line divided by the local radius, < 1 inside."""

    def __init__(self, points, radii):
        self.p = np.asarray(points, float)
        self.rad = np.asarray(radii, float)

    def bounds(self, grow: float) -> tuple[np.ndarray, np.ndarray]:
        r = self.rad.max() * grow
        return self.p.min(0) - r, self.p.max(0) + r

    def value(self, z, y, x) -> np.ndarray:
        z, y, x = (np.asarray(c, np.float32) for c in (z, y, x))
        out = np.full((len(z), len(y), len(x)), np.inf, np.float32)
        grow = 1.6
        for p0, p1, r0, r1 in zip(self.p[:-1], self.p[1:], self.rad[:-1], self.rad[1:]):
            rmax = max(r0, r1) * grow
            lo, hi = np.minimum(p0, p1) - rmax, np.maximum(p0, p1) + rmax
            sx, sy, sz = (_index_range(c, lo[i], hi[i]) for i, c in enumerate((x, y, z)))
            if sx.start >= sx.stop or sy.start >= sy.stop or sz.start >= sz.stop:
                continue
            d = (p1 - p0).astype(np.float32)
            length2 = max(float(d @ d), 1e-6)
            wx, wy, wz = x[sx] - np.float32(p0[0]), y[sy] - np.float32(p0[1]), z[sz] - np.float32(p0[2])
            t = (d[0] * wx)[None, None, :] + (d[1] * wy)[None, :, None] + (d[2] * wz)[:, None, None]
            t = np.clip(t / np.float32(length2), 0, 1)
            ex = wx[None, None, :] - t * d[0]
            dist2 = ex * ex
            ey = wy[None, :, None] - t * d[1]
            dist2 += ey * ey
            ez = wz[:, None, None] - t * d[2]
            dist2 += ez * ez
            v = np.sqrt(dist2) / (np.float32(r0) + t * np.float32(r1 - r0))
            np.minimum(out[sz, sy, sx], v, out=out[sz, sy, sx])
        return out


def _index_range(coords: np.ndarray, lo: float, hi: float) -> slice:
    """Indices of the increasing coordinates that lie in [lo, hi]."""
    return slice(int(np.searchsorted(coords, lo, "left")), int(np.searchsorted(coords, hi, "right")))


@dataclass
class Structure:
    """One organ or unlabelled structure: a union of shapes minus holes, with a smooth
    surface perturbation ``amp * field`` (normalised units) and an intensity rule.

    kind: ``solid`` (hu + texture), ``kidney`` (cortex / medulla), ``hollow`` (wall and
    lumen: fluid or mottled content, gas anterior to a level, as in a supine patient).
    region: where it may lie: ``abdomen`` (cavity below the diaphragm), ``through``
    (cavity, both sides of the diaphragm), ``ivc`` (cavity up to just above the diaphragm),
    ``chest`` (cavity above the diaphragm). Spine and back muscles are never in a region.
    """

    name: str
    label: int
    parts: list
    holes: list = field(default_factory=list)
    amp: float = 0.08
    noise: Field | None = None
    kind: str = "solid"
    hu: float = 40.0
    tex: float = 4.0
    region: str = "abdomen"
    wall_frac: float = 0.0
    wall_hu: float = 40.0
    lumen_hu: float = 10.0
    lumen_mottle: float = 0.0
    gas_below_y: float = -np.inf  # lumen voxels with atlas y below this hold gas
    medulla_hu: float = 0.0
    erase: bool = False  # label 0 that also clears the labels it covers (fat around a gland)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        grow = 1.0 + 2.0 * self.amp + 0.02
        los, his = zip(*(p.bounds(grow) for p in self.parts))
        return np.min(los, 0), np.max(his, 0)

    def value(self, z, y, x) -> np.ndarray:
        v = None
        for p in self.parts:
            pv = p.value(z, y, x)
            v = pv if v is None else np.minimum(v, pv)
        for h in self.holes:
            v = np.maximum(v, 2.0 - h.value(z, y, x))
        return v


def _bowel_path(rng: np.random.Generator, steps: int = 260, step_mm: float = 12.0):
    """Small bowel: a persistent, roughly self-avoiding random walk from the
    duodenojejunal flexure, kept inside the lower anterior abdomen (atlas mm)."""
    lo, hi = np.array([-100.0, -88.0, -200.0]), np.array([95.0, 20.0, 0.0])
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    p = np.array([38.0, -18.0, -2.0])
    d = np.array([0.0, 0.0, -1.0])
    pts = [p]
    for _ in range(steps):
        nd = d[None, :] + 0.9 * rng.normal(size=(10, 3))  # ten candidate directions
        nd /= np.linalg.norm(nd, axis=1, keepdims=True)
        q = p[None, :] + step_mm * nd
        excess = np.maximum(0.0, np.sum(((q - mid) / half) ** 2, axis=1) - 1.0)
        if len(pts) > 2:
            past = np.asarray(pts[:-2])
            gap = np.min(np.linalg.norm(past[None, :, :] - q[:, None, :], axis=2), axis=1)
        else:
            gap = np.full(len(q), 40.0)
        best = int(np.argmax(np.minimum(gap, 30.0) - 200.0 * excess))
        p, d = q[best], nd[best]
        pts.append(p)
    radii = np.linspace(13.0, 10.0, len(pts)) * rng.uniform(0.9, 1.1)
    return np.asarray(pts), radii


# ----------------------------------------------------------------------------------------
# The drawn patient
# ----------------------------------------------------------------------------------------
@dataclass
class Patient:
    """Everything drawn from the seed that defines the anatomy and the intensities."""

    scale: np.ndarray  # atlas -> physical, per axis (x, y, z)
    z_range: tuple[float, float]  # atlas z of the lowest and highest slice centre
    cavity: dict  # half-axes and their variation along z
    fat_mm: float
    fat_field: Field
    lung_field: Field
    muscle_mm: float
    domes: dict
    spine: dict
    ribs: dict
    iliac_crest: float
    structures: list  # painted in order; later ones win
    vessels: list  # unlabelled vessels painted over label 0 / liver only
    hu: dict
    noise_sd: float
    table: dict | None


def _u(rng, lo, hi):
    return float(rng.uniform(lo, hi))


def _tnormal(rng, sd, shape):
    """Normal jitter cut at two standard deviations (keeps organs where they belong)."""
    sd = np.asarray(sd, float)
    return np.clip(rng.normal(0, sd, shape), -2 * sd, 2 * sd)


def draw_patient(rng: np.random.Generator) -> Patient:
    """Draw one patient: build, body wall, skeleton, diaphragm, organs and intensities."""
    scale = np.array([_u(rng, 0.88, 1.12), _u(rng, 0.88, 1.12), _u(rng, 0.9, 1.1)])
    z_range = (_u(rng, -200, -100), _u(rng, 150, 195))
    cavity = dict(
        a=_u(rng, 128, 142), b_ant=_u(rng, 88, 102), b_post=_u(rng, 104, 112),
        belly=_u(rng, 0.0, 0.18), hips=_u(rng, 0.04, 0.12),
        wobble=_u(rng, 0.0, 0.04), wobble_phase=_u(rng, 0, 2 * np.pi),
    )
    fat_mm = _u(rng, 8, 42)
    fat_field = Field(rng, (150, 400), k=4)
    muscle_mm = _u(rng, 9, 14)
    contrast = 0.0 if rng.uniform() < 0.2 else _u(rng, 0.5, 1.2)

    def jit(c, sd=5.0):
        c = np.asarray(c, float)
        return c + _tnormal(rng, sd, c.shape)

    def size(s, lo=0.88, hi=1.12):
        return np.asarray(s, float) * rng.uniform(lo, hi)

    def ang(a, sd=6.0):
        return np.asarray(a, float) + _tnormal(rng, sd, 3)

    def hu(unenhanced, enhancement, sd=5.0):
        return unenhanced + contrast * enhancement + float(rng.normal(0, sd))

    def noise(wavelength):
        return Field(rng, wavelength, k=5)

    def tube(points, radii, sd=4.0, lo=0.88, hi=1.12):
        pts = np.asarray(points, float) + _tnormal(rng, sd, 3)
        return Tube(pts + _tnormal(rng, sd / 3, pts.shape), size(radii, lo, hi))

    # Diaphragm: two paraboloid domes; the liver and spleen fill them from below.
    domes = dict(
        right=(*jit((-55.0, 10.0), 6), _u(rng, 140, 158)),
        left=(*jit((55.0, 15.0), 6), _u(rng, 128, 146)),
        curvature=_u(rng, 48, 62),
    )
    spine = dict(
        centre_y=_u(rng, 40, 46), period=_u(rng, 30, 35), phase=_u(rng, 0, 1),
        disc_frac=_u(rng, 0.16, 0.24), body_semi=size((21.0, 16.0), 0.92, 1.08),
        cortex_hu=_u(rng, 650, 800), marrow_hu=_u(rng, 200, 320),
        arch_hu=_u(rng, 450, 650), disc_hu=_u(rng, 70, 110),
        psoas_top=_u(rng, 15, 35),
    )
    ribs = dict(u0=_u(rng, 28, 45), period=_u(rng, 25, 30), slope=_u(rng, 30, 40),
                height=_u(rng, 8, 11), hu=_u(rng, 350, 550), cartilage_hu=_u(rng, 100, 160))

    s = []  # labelled organs, paint order
    liver_noise = noise((60, 180))
    s.append(Structure(
        "liver", LIVER,
        parts=[Ellipsoid(jit((-72, 12, 74)), size((64, 80, 80)), ang((0, 14, 0))),
               Ellipsoid(jit((0, -50, 100)), size((52, 26, 32)), ang((-12, 0, 0))),
               Ellipsoid(jit((-18, 12, 82), 3), size((22, 20, 32)))],
        amp=0.06, noise=liver_noise, hu=hu(50, 18), tex=5))
    spleen_c = jit((94, 50, 66), 4)
    radial = np.array([0.8, 0.6, 0.0])
    s.append(Structure(
        "spleen", SPLEEN,
        parts=[Ellipsoid(spleen_c, size((24, 56, 50)), ang((37, 0, 0), 8))],
        holes=[Ellipsoid(spleen_c - 38 * radial, size((26, 40, 42)), ang((37, 0, 0)))],
        amp=0.07, noise=noise((50, 140)), hu=hu(45, 22), tex=4))
    kidney_z = float(_tnormal(rng, 8.0, 1)[0])  # shared: the right kidney stays the lower one
    for label, side, c in ((R_KIDNEY, -1, (-75, 46, -5)), (L_KIDNEY, 1, (75, 46, 12))):
        kc = np.asarray(c, float) + _tnormal(rng, (6.0, 6.0, 2.5), 3) + (0.0, 0.0, kidney_z)
        semi = size((26, 21, 55), 0.9, 1.1)
        angles = ang((side * -35, side * 12, -14), 5)
        hilum = np.array([-side * np.cos(np.deg2rad(35)), -np.sin(np.deg2rad(35)), 0.0])
        s.append(Structure(
            "right_kidney" if side < 0 else "left_kidney", label,
            parts=[Ellipsoid(kc, semi, angles)],
            holes=[Ellipsoid(kc + 0.85 * semi[0] * hilum, (13, 10, 20), angles)],
            amp=0.05, noise=noise((40, 100)), kind="kidney", hu=hu(35, 125), medulla_hu=hu(30, 80), tex=3))
    gas = -np.inf if rng.uniform() < 0.25 else _u(rng, -78, -45)
    stomach_oral = rng.uniform() < 0.25
    s.append(Structure(
        "stomach", STOMACH,
        parts=[tube([(52, 18, 112), (60, -8, 82), (50, -35, 54), (22, -50, 34), (-8, -45, 30), (-22, -32, 32)],
                    [36, 34, 30, 23, 15, 11], sd=5)],
        amp=0.07, noise=noise((40, 110)), kind="hollow", wall_frac=0.14, wall_hu=hu(40, 30),
        lumen_hu=_u(rng, 180, 320) if stomach_oral else _u(rng, 5, 30),
        lumen_mottle=0.0 if stomach_oral else _u(rng, 0, 25), gas_below_y=gas))
    s.append(Structure(
        "gallbladder", GALLBLADDER,
        parts=[Ellipsoid(jit((-48, -50, 18), 5), size((16, 16, 36), 0.8, 1.15), ang((0, 0, 28)))],
        amp=0.05, noise=noise((40, 90)), hu=hu(10, 0, 4), tex=2))
    s.append(Structure(
        "pancreas", PANCREAS,
        parts=[tube([(-38, -2, 8), (-14, -14, 20), (15, -12, 25), (48, 4, 35), (76, 22, 47)],
                    [17, 12, 11, 11, 9])],
        amp=0.09, noise=noise((25, 70)), hu=hu(40, 45), tex=6))
    s.append(Structure(
        "duodenum", DUODENUM,
        parts=[tube([(-22, -32, 32), (-45, -22, 38), (-61, -5, 28), (-63, 2, 5), (-55, 4, -18),
                     (-25, -4, -30), (5, -10, -32), (28, -12, -20), (38, -18, -2)],
                    [11, 13, 12, 12, 12, 11, 11, 11, 10], sd=3)],
        amp=0.07, noise=noise((30, 80)), kind="hollow", wall_frac=0.3, wall_hu=hu(40, 30),
        lumen_hu=_u(rng, 0, 30), lumen_mottle=_u(rng, 5, 30), gas_below_y=_u(rng, -45, -25)))
    s.append(Structure(
        "inferior_vena_cava", IVC,
        parts=[tube([(-20, 18, -125), (-24, 16, -40), (-26, 12, 30), (-27, 2, 90), (-20, -2, 175)],
                    [11, 12, 12, 13, 14], sd=2)],
        amp=0.04, noise=noise((40, 90)), hu=hu(40, 90), tex=3, region="ivc"))
    s.append(Structure(
        "aorta", AORTA,
        parts=[tube([(26, 22, 230), (24, 19, 140), (18, 15, 80), (14, 14, 0), (12, 12, -60), (8, 10, -110)],
                    [12.5, 12, 11.5, 11, 10, 9], sd=2)],
        amp=0.03, noise=noise((40, 90)), hu=hu(40, 160), tex=3, region="through"))
    s.append(Structure(
        "esophagus", ESOPHAGUS,
        parts=[tube([(2, 6, 230), (4, 5, 135), (12, -2, 108), (26, -6, 96), (34, -4, 96)],
                    [9, 9, 9, 8.5, 8], sd=2)],
        amp=0.06, noise=noise((30, 70)), kind="hollow", wall_frac=0.7, wall_hu=hu(40, 15),
        lumen_hu=AIR if rng.uniform() < 0.5 else 20.0, region="through"))
    for label, c, semi, a in ((R_ADRENAL, (-42, 36, 72), (6, 13, 16), (70, 0, 0)),
                              (L_ADRENAL, (40, 33, 60), (6, 13, 16), (-30, 0, 0))):
        centre, semi_mm, angles = jit(c, 3), size(semi), ang(a, 8)
        # Each gland lies in its own pad of retroperitoneal fat. Without it the right one,
        # which sits against the liver's bare area, was drawn inside the liver at the
        # liver's density: an organ nobody could see. (No random draw here: the rest of
        # the patient stays as the seed made it.)
        s.append(Structure(
            "adrenal_fat", 0, parts=[Ellipsoid(centre, semi_mm + 5.0, angles)],
            amp=0.0, hu=FAT + 15.0, tex=0.0, erase=True))
        s.append(Structure(ORGANS[label], label, parts=[Ellipsoid(centre, semi_mm, angles)], amp=0.05, noise=noise((25, 60)),
                           hu=hu(30, 30), tex=3))

    # Unlabelled structures under the organs (painted first) ...
    oral = rng.uniform() < 0.3
    under = [
        Structure("small_bowel", 0, parts=[Tube(*_bowel_path(rng))], amp=0.1, noise=noise((30, 70)),
                  kind="hollow", wall_frac=0.25, wall_hu=hu(40, 35),
                  lumen_hu=_u(rng, 150, 300) if oral else _u(rng, 0, 25), lumen_mottle=_u(rng, 0, 10),
                  gas_below_y=_u(rng, -110, -60)),
        Structure("colon", 0,
                  parts=[tube([(-100, -12, -240), (-102, -15, -40), (-85, -38, 5), (-55, -62, -5),
                               (0, -65, -22), (55, -62, -5), (95, -25, 38), (100, 12, -20), (96, 10, -240)],
                              [22, 22, 21, 20, 20, 20, 19, 18, 18], sd=5)],
                  amp=0.12, noise=noise((25, 60)), kind="hollow", wall_frac=0.12, wall_hu=hu(40, 20),
                  lumen_hu=_u(rng, -20, 40), lumen_mottle=_u(rng, 40, 120), gas_below_y=_u(rng, -70, -20)),
        Structure("mediastinum", 0, parts=[Ellipsoid(jit((5, 12, 200), 4), size((48, 42, 90)))],
                  amp=0.08, noise=noise((40, 90)), hu=FAT + 20, tex=10, region="chest"),
        Structure("heart", 0, parts=[Ellipsoid(jit((15, -30, 190), 6), size((72, 56, 62)), ang((25, 0, 0)))],
                  amp=0.04, noise=noise((60, 120)), hu=hu(40, 120), tex=4, region="chest"),
    ]
    # ... and vessels over label 0 / liver only (their intrahepatic part stays liver).
    vessels = [
        Structure("portal_vein", 0, parts=[tube([(-10, -2, 20), (-28, 4, 50), (-58, 10, 72)], [8, 8, 6])],
                  amp=0.03, noise=noise((40, 90)), hu=hu(40, 120), tex=2),
        Structure("left_portal", 0, parts=[tube([(-28, 4, 50), (-5, -20, 78), (20, -38, 92)], [6, 5, 4])],
                  amp=0.03, noise=noise((40, 90)), hu=hu(40, 120), tex=2),
        Structure("splenic_vein", 0, parts=[tube([(-10, -2, 20), (30, 2, 28), (80, 34, 52)], [5, 5, 5])],
                  amp=0.03, noise=noise((40, 90)), hu=hu(40, 110), tex=2),
        Structure("left_renal_vein", 0, parts=[tube([(60, 38, 14), (14, -4, 10), (-22, 12, 8)], [5, 4.5, 5])],
                  amp=0.03, noise=noise((40, 90)), hu=hu(40, 100), tex=2),
        Structure("right_renal_vein", 0, parts=[tube([(-58, 36, 2), (-26, 14, 4)], [5, 5])],
                  amp=0.03, noise=noise((40, 90)), hu=hu(40, 100), tex=2),
        Structure("iliac_arteries", 0, parts=[tube([(-45, 6, -260), (8, 10, -108), (52, 6, -260)], [7, 8, 7])],
                  amp=0.03, noise=noise((40, 90)), hu=hu(40, 150), tex=2),
        Structure("iliac_veins", 0, parts=[tube([(-50, 18, -260), (-20, 18, -122), (42, 20, -260)], [8, 9, 8])],
                  amp=0.03, noise=noise((40, 90)), hu=hu(40, 80), tex=2),
    ]
    hu_tissue = dict(fat=FAT + float(rng.normal(0, 8)), muscle=MUSCLE + float(rng.normal(0, 6)),
                     lung=LUNG + float(rng.normal(0, 25)), offset=float(rng.normal(0, 4)))
    table = None
    if rng.uniform() < 0.7:
        table = dict(gap=_u(rng, 5, 40), sag=_u(rng, 0.0005, 0.0015), hu=_u(rng, 100, 300))
    return Patient(
        scale=scale, z_range=z_range, cavity=cavity, fat_mm=fat_mm, fat_field=fat_field,
        lung_field=Field(rng, (15, 40), k=8), muscle_mm=muscle_mm, domes=domes, spine=spine, ribs=ribs, iliac_crest=_u(rng, -135, -105),
        structures=under + s, vessels=vessels, hu=hu_tissue,
        noise_sd=_u(rng, 6, 16), table=table,
    )


# ----------------------------------------------------------------------------------------
# Grid
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Grid:
    """A canonical (identity-direction) voxel grid and where the atlas sits on it."""

    shape_zyx: tuple[int, int, int]
    spacing_xyz: tuple[float, float, float]
    origin_xyz: tuple[float, float, float]
    centre_xyz: tuple[float, float, float]  # physical position of the atlas origin

    def atlas_axes(self, scale) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Atlas coordinates (mm) of the voxel centres along z, y and x (increasing)."""
        out = []
        for i, n in enumerate(self.shape_zyx[::-1]):  # x, y, z
            phys = self.origin_xyz[i] + self.spacing_xyz[i] * np.arange(n)
            out.append(((phys - self.centre_xyz[i]) / scale[i]).astype(np.float32))
        x, y, z = out
        return z, y, x


def draw_grid(rng: np.random.Generator, patient: Patient, shape_zyx, spacing=None) -> Grid:
    """Field of view that fits the patient (0.6-1.0 mm pixels at 512 x 512), axial coverage
    of the drawn z range; ``shape_zyx[0] = None`` draws the slice spacing (1.5-5 mm)."""
    nz, ny, nx = shape_zyx
    sc = patient.scale
    half_width = (patient.cavity["a"] + patient.muscle_mm + 1.15 * patient.fat_mm) * sc[0]  # mid abdomen
    fov = float(np.clip(2 * half_width / rng.uniform(0.72, 0.9), *FOV_MM))
    slice_mm = _u(rng, *SLICE_MM)
    offset = rng.uniform(-0.04, 0.04, 2) * fov
    z_lo, z_hi = patient.z_range
    extent = (z_hi - z_lo) * sc[2]
    slice_z = None
    if nz is None:
        nz = max(2, int(round(extent / slice_mm)) + 1)
        slice_z = slice_mm
    if spacing is None:
        pixel = fov / max(nx, ny)
        spacing = (pixel, pixel, slice_z or extent / max(nz - 1, 1))
    spacing = tuple(float(v) for v in spacing)
    origin_z = _u(rng, -600, -100)
    origin = (-0.5 * spacing[0] * (nx - 1), -0.5 * spacing[1] * (ny - 1), origin_z)
    # The atlas z range maps onto the slices; a given spacing keeps the middle of the range.
    z_mid_atlas = 0.5 * (z_lo + z_hi)
    centre_z = origin_z + 0.5 * spacing[2] * (nz - 1) - z_mid_atlas * sc[2]
    centre = (float(offset[0]), float(offset[1]), float(centre_z))
    return Grid((int(nz), int(ny), int(nx)), spacing, tuple(float(v) for v in origin), centre)


# ----------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------
def _sigmoid(t):
    return 1.0 / (1.0 + np.exp(-t))


class _Chunk:
    """The working arrays of a slab of slices."""

    def __init__(self, z, y, x):
        self.z, self.y, self.x = z, y, x
        shape = (len(z), len(y), len(x))
        self.hu = np.full(shape, AIR, np.float32)
        self.lab = np.zeros(shape, np.uint8)
        self.regions: dict[str, np.ndarray] = {}


def _diaphragm(p: Patient, y, x) -> np.ndarray:
    """Atlas z of the diaphragm under each (y, x): the higher of two paraboloid domes."""
    out = None
    k = 1.0 / (2 * p.domes["curvature"])
    for xc, yc, h in (p.domes["right"], p.domes["left"]):
        dy = y[:, None] - yc
        ky = np.where(dy > 0, 1.3, 0.55)  # the posterior recesses reach lower than the front
        dome = h - k * ((x[None, :] - xc) ** 2 + ky * dy**2)
        out = dome if out is None else np.maximum(out, dome)
    return out.astype(np.float32)


def _paint_body(p: Patient, c: _Chunk, inplane: dict) -> None:
    """Air, skin, subcutaneous fat, muscle wall, cavity (fat); lungs and diaphragm above."""
    cav = p.cavity
    z = c.z.astype(np.float64)
    a = cav["a"] * (1 + cav["hips"] * _sigmoid((-z - 115) / 25) + cav["wobble"] * np.sin(z / 90 + cav["wobble_phase"]))
    b_ant = cav["b_ant"] * (1 + cav["belly"] * _sigmoid((-z - 20) / 50))
    b_post = np.full_like(z, cav["b_post"])
    inv_a2 = (1.0 / a**2).astype(np.float32)
    yy = c.y[None, :]
    inv_b2 = np.where(yy < 0, 1.0 / b_ant[:, None] ** 2, 1.0 / b_post[:, None] ** 2).astype(np.float32)
    rho2 = (c.x**2)[None, None, :] * inv_a2[:, None, None] + (c.y**2)[None, :, None] * inv_b2[:, :, None]
    rho = np.sqrt(np.maximum(rho2, 1e-6))
    outside = inplane["r"] - inplane["r"] / rho  # mm outside the cavity along the ray from the centre
    wall = p.muscle_mm
    fat_z = (1 + 0.1 * np.sin(c.z / 70.0 + p.cavity["wobble_phase"])).astype(np.float32)
    limit = inplane["fat_map"][None] * fat_z[:, None, None] + np.float32(wall)  # skin surface
    body = outside < limit
    c.hu[body] = p.hu["fat"]
    c.hu[(outside >= limit - 1.5) & body] = 10.0  # skin
    c.hu[(outside >= 0) & (outside < wall)] = p.hu["muscle"]
    cavity = rho2 < 1
    c.hu[cavity] = p.hu["fat"] + 6.0
    zd = inplane["diaphragm"][None]
    zz = c.z[:, None, None]
    above = zz > zd + 3.0
    lung = cavity & above
    if lung.any():
        f = p.lung_field(c.z, c.y, c.x)
        c.hu[lung] = (p.hu["lung"] + 25 * f)[lung]
        c.hu[lung & (np.abs(f) < 0.03)] = 30.0  # vessels
    c.hu[cavity & (np.abs(zz - zd) <= 3.0)] = p.hu["muscle"]
    c.regions.update(cavity=cavity, rho=rho, outside=outside, below=zz < zd - 3.0, above=above, zd_dist=zz - zd)


def _spine_masks(p: Patient, y, x) -> dict:
    """In-plane masks of the vertebra's parts and the back muscles (constant along z)."""
    sp = p.spine
    cy = sp["centre_y"]
    bx, by = sp["body_semi"]
    Y, X = y[:, None], x[None, :]
    body_v = np.sqrt((X / bx) ** 2 + ((Y - cy) / by) ** 2)
    canal_y = cy + by + 9.0
    canal = (X / 9.0) ** 2 + ((Y - canal_y) / 7.5) ** 2 < 1
    ring = ((X / 16.0) ** 2 + ((Y - canal_y - 2) / 13.0) ** 2 < 1) & ~canal & (Y > cy + by - 3)
    spinous = (np.abs(X) < 4.0) & (Y > canal_y + 8) & (Y < canal_y + 38 - 0.15 * X**2)
    transverse = (np.abs(X) > 10) & (np.abs(X) < 46) & (np.abs(Y - (canal_y - 2)) < 4.5 - 0.05 * np.abs(X))
    paraspinal = ((np.abs(X) - 34) / 28) ** 2 + ((Y - (canal_y + 14)) / 24) ** 2 < 1
    paraspinal |= (np.abs(X) < 34) & (Y > canal_y) & (Y < canal_y + 48)  # the groove beside the spinous process
    return dict(body_v=body_v, canal=canal, ring=ring, spinous=spinous, transverse=transverse,
                paraspinal=paraspinal & ~spinous)


def _paint_back(p: Patient, c: _Chunk, inplane: dict) -> None:
    """Spine (periodic along z), canal, back muscles and psoas; marks them off the cavity."""
    sp, m = p.spine, inplane["spine"]
    phase = ((c.z - sp["phase"] * sp["period"]) / sp["period"]) % 1.0
    disc = phase < sp["disc_frac"]
    arch = (phase > 0.3) & (phase < 0.85)
    spinous = (phase > 0.4)
    transverse = (phase > 0.4) & (phase < 0.7)
    block = np.broadcast_to(m["paraspinal"] | m["canal"] | m["ring"] | m["spinous"] | (m["body_v"] < 1.05),
                            c.hu.shape).copy()
    c.hu[np.broadcast_to(m["paraspinal"], c.hu.shape) & (c.regions["outside"] < p.muscle_mm)] = p.hu["muscle"] + 5
    # psoas: grows from nothing below psoas_top toward the pelvis, drifting lateral
    depth = np.clip((sp["psoas_top"] - c.z) / 110.0, 0, None)
    r = (24 * np.minimum(depth, 1.3) ** 0.7).astype(np.float32)
    if np.any(r > 0):
        cx = 22 + r + 0.08 * (sp["psoas_top"] - c.z).clip(0)
        cyp = sp["centre_y"] - 8 + 0.3 * r
        rr = np.maximum(r, 1e-3)[:, None, None]
        psoas = (((np.abs(c.x)[None, None, :] - cx[:, None, None]) / rr) ** 2
                 + ((c.y[None, :, None] - cyp[:, None, None]) / (0.85 * rr)) ** 2) < 1
        psoas &= (r > 0)[:, None, None]
        c.hu[psoas] = p.hu["muscle"]
        block |= psoas
    body = m["body_v"] < 1
    cortex = m["body_v"] > 1 - 2.5 / sp["body_semi"][1]
    vb_hu = np.where(cortex, sp["cortex_hu"], sp["marrow_hu"]).astype(np.float32)
    for k in range(len(c.z)):
        h = c.hu[k]
        if disc[k]:
            h[body] = sp["disc_hu"]
        else:
            h[body] = vb_hu[body]
        h[m["canal"]] = 15.0
        if arch[k]:
            h[m["ring"]] = sp["arch_hu"]
        if spinous[k]:
            h[m["spinous"]] = sp["arch_hu"]
        if transverse[k]:
            lumbar = c.z[k] < p.ribs["u0"] + 10
            tp = m["transverse"] if lumbar else m["transverse"] & (np.abs(c.x)[None, :] < 30)
            h[tp] = sp["arch_hu"]
    c.regions["block"] = block


def _paint_ribs(p: Patient, c: _Chunk, inplane: dict) -> None:
    """Ribs: oblique bands in the body wall, descending anteriorly, on both sides."""
    rb = p.ribs
    lowest = rb["u0"] - rb["slope"] * np.pi - rb["height"]
    ks = np.nonzero(c.z > lowest)[0]
    if len(ks) == 0:
        return
    sl = slice(ks[0], len(c.z))
    ring = np.abs(c.regions["outside"][sl] - np.float32(0.5 * p.muscle_mm)) < 4.0
    iz, iy, ix = np.nonzero(ring)  # the wall band: a small share of the voxels
    theta = inplane["theta_post"][iy, ix]  # angle from the posterior midline, 0..pi
    u = c.z[sl][iz] + rb["slope"] * theta
    k = np.floor((u - rb["u0"]) / rb["period"] + 0.5)
    near = np.abs(u - rb["u0"] - k * rb["period"]) < rb["height"] / 2
    reach = np.array([1.1, 1.7, 2.3, 2.6, 2.85, 2.95, 3.0, 3.0, 3.0, 3.0], np.float32)  # rib 12, 11, ...
    max_theta = reach[np.clip(k, 0, len(reach) - 1).astype(np.int64)]
    rib = near & (k >= 0) & (theta > 0.7) & (theta < max_theta)
    hu = c.hu[sl]
    hu[iz[rib], iy[rib], ix[rib]] = np.where(theta[rib] > 2.35, rb["cartilage_hu"], rb["hu"])


def _paint_pelvis(p: Patient, c: _Chunk, inplane: dict) -> None:
    """Iliac wings: curved bone plates in the posterolateral cavity below the crest."""
    ks = np.nonzero(c.z < p.iliac_crest)[0]
    if len(ks) == 0:
        return
    sl = slice(0, ks[-1] + 1)
    theta = inplane["theta_post"][None]
    depth = (p.iliac_crest - c.z[sl])[:, None, None]
    rho = c.regions["rho"][sl]
    span = (theta > 0.55) & (theta < 1.0 + np.minimum(depth / 60.0, 0.9))
    plate = span & (rho > 0.80) & (rho < 0.87) & c.regions["cavity"][sl]
    muscle = span & (rho >= 0.70) & (rho < 1.0) & c.regions["cavity"][sl] & ~plate
    c.hu[sl][muscle] = p.hu["muscle"]
    c.hu[sl][plate] = 450.0
    c.regions["block"][sl] |= plate | muscle


def _paint(s: Structure, c: _Chunk, *, label_only_over=None) -> None:
    """Rasterise one structure on the chunk: mask = value - amp * noise < 1 in its region."""
    lo, hi = s.bounds()
    sx, sy, sz = (_index_range(a, lo[i], hi[i]) for i, a in enumerate((c.x, c.y, c.z)))
    if sx.start >= sx.stop or sy.start >= sy.stop or sz.start >= sz.stop:
        return
    z, y, x = c.z[sz], c.y[sy], c.x[sx]
    v = s.value(z, y, x)
    n = np.clip(s.noise(z, y, x), -2, 2) if s.noise is not None else np.zeros_like(v)
    inside = v - s.amp * n < 1
    inside &= c.regions[s.region][sz, sy, sx]
    if label_only_over is not None:
        inside &= np.isin(c.lab[sz, sy, sx], label_only_over)
    if not inside.any():
        return
    hu = c.hu[sz, sy, sx]
    if s.kind == "solid":
        vals = s.hu + s.tex * n
    elif s.kind == "kidney":
        vals = np.where(v + 0.08 * n > 0.7, s.hu, s.medulla_hu) + s.tex * n
    elif s.kind == "hollow":
        lumen = v < 1 - s.wall_frac
        vals = np.where(lumen, s.lumen_hu + s.lumen_mottle * n * 1.5, s.wall_hu)
        vals = np.where(lumen & (y[None, :, None] < s.gas_below_y), AIR, vals)
        if s.lumen_mottle > 30:  # stool: gas pockets
            vals = np.where(lumen & (n > 1.1), AIR + 50, vals)
    else:
        raise ValueError(f"unknown structure kind {s.kind!r}")
    hu[inside] = vals[inside]
    if s.label or s.erase:
        c.lab[sz, sy, sx][inside] = s.label


def _inplane(p: Patient, y: np.ndarray, x: np.ndarray) -> dict:
    """Per-case in-plane maps, computed once: polar radius and angle, fat profile, diaphragm."""
    Y, X = y[:, None], x[None, :]
    r = np.sqrt(X**2 + Y**2).astype(np.float32)
    theta = np.arctan2(Y, X)  # y posterior: theta = +pi/2 at the posterior midline
    theta_post = np.abs(np.angle(np.exp(1j * (theta - np.pi / 2)))).astype(np.float32)
    sin = np.sin(theta)
    profile = (1.0 - 0.35 * sin + 0.15 * np.cos(2 * theta)).clip(0.3)
    fat_map = p.fat_mm * profile * (1 + 0.1 * p.fat_field(np.zeros(1, np.float32), y, x)[0])
    return dict(r=r, theta_post=theta_post, fat_map=fat_map.astype(np.float32),
                diaphragm=_diaphragm(p, y, x), spine=_spine_masks(p, y, x))


def _paint_table(p: Patient, hu: np.ndarray, y_phys: np.ndarray, x_phys: np.ndarray, body_back: float) -> None:
    """The scanner table: a thin cradle behind the patient, rising toward its edges (air only)."""
    t = p.table
    if t is None:
        return
    y0 = body_back + t["gap"] - t["sag"] * (x_phys**2)
    inside = (y_phys[:, None] > y0[None, :]) & (y_phys[:, None] < y0[None, :] + 4.0) & (np.abs(x_phys) < 230)[None, :]
    sl = hu[:, inside]
    hu[:, inside] = np.where(sl < -900, t["hu"], sl)


def render(patient: Patient, grid: Grid, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise a patient on a canonical grid: int16 HU and uint8 labels, (z, y, x)."""
    z_all, y, x = grid.atlas_axes(patient.scale)
    inplane = _inplane(patient, y, x)
    nz, ny, nx = grid.shape_zyx
    image = np.empty((nz, ny, nx), np.int16)
    labels = np.empty((nz, ny, nx), np.uint8)
    y_phys = grid.origin_xyz[1] + grid.spacing_xyz[1] * np.arange(ny)
    x_phys = grid.origin_xyz[0] + grid.spacing_xyz[0] * np.arange(nx)
    cav = patient.cavity
    body_back = grid.centre_xyz[1] + (cav["b_post"] + patient.muscle_mm + 0.65 * patient.fat_mm * 1.15) * patient.scale[1]
    raw_sd = patient.noise_sd / 0.375  # the [1 2 1]/4 x [1 2 1]/4 smoothing keeps 0.375 of white noise
    # Partial-volume blur of about half a millimetre: the full [1 2 1]/4 kernel at pixels up
    # to 0.8 mm, fading out on coarser grids (which would otherwise blur centimetres).
    blur = float(min(0.25, 0.25 * 0.8 / max(grid.spacing_xyz[0], grid.spacing_xyz[1])))
    for z0 in range(0, nz, CHUNK_SLICES):
        z1 = min(nz, z0 + CHUNK_SLICES)
        c = _Chunk(z_all[z0:z1], y, x)
        _paint_body(patient, c, inplane)
        _paint_back(patient, c, inplane)
        _paint_pelvis(patient, c, inplane)
        cavity, block = c.regions["cavity"], c.regions["block"]
        c.regions["through"] = cavity & ~block
        c.regions["abdomen"] = c.regions["through"] & c.regions["below"]
        c.regions["ivc"] = c.regions["through"] & (c.regions["zd_dist"] < 8.0)
        c.regions["chest"] = c.regions["through"] & c.regions["above"]
        for s in patient.structures:
            _paint(s, c)
        for s in patient.vessels:
            _paint(s, c, label_only_over=(0, LIVER))
        _paint_ribs(patient, c, inplane)
        hu = c.hu
        _paint_table(patient, hu, y_phys, x_phys, body_back)
        lut = _GAUSS_LUT * np.float32(raw_sd)
        noise = np.empty_like(hu)
        for k in range(z1 - z0):
            rng = np.random.default_rng([seed, _NOISE_STREAM, z0 + k])
            noise[k] = lut[rng.integers(0, 256, (ny, nx), dtype=np.uint8)]
        hu += noise
        hu = _smooth_inplane(hu, 0.25) if blur == 0.25 else _smooth_inplane(hu - noise, blur) + _smooth_inplane(noise, 0.25)
        hu += np.float32(patient.hu["offset"])
        image[z0:z1] = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
        labels[z0:z1] = c.lab
    return image, labels


def _smooth_inplane(a: np.ndarray, w: float) -> np.ndarray:
    """[w, 1 - 2w, w] along y and x, edges replicated; w = 0.25 is [1 2 1]/4."""
    for axis in (1, 2):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis], hi[axis] = slice(0, -1), slice(1, None)
        lo, hi = tuple(lo), tuple(hi)
        out = a * np.float32(1 - 2 * w)
        out[hi] += np.float32(w) * a[lo]
        out[lo] += np.float32(w) * a[hi]
        edge0 = [slice(None)] * 3
        edge1 = [slice(None)] * 3
        edge0[axis], edge1[axis] = slice(0, 1), slice(-1, None)
        out[tuple(edge0)] += np.float32(w) * a[tuple(edge0)]
        out[tuple(edge1)] += np.float32(w) * a[tuple(edge1)]
        a = out
    return a


# ----------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------
@dataclass
class Case:
    """A generated case: canonical arrays (z, y, x) and the canonical grid."""

    seed: int
    image: np.ndarray  # int16 HU
    labels: np.ndarray  # uint8 FLARE22 ids
    grid: Grid

    def images(self, *, random_orientation: bool = False) -> tuple[sitk.Image, sitk.Image]:
        """SimpleITK image and label map on the same grid, canonical or in a random orientation."""
        img, lab = _to_sitk(self.image, self.grid), _to_sitk(self.labels, self.grid)
        if random_orientation:
            perm, flips = draw_orientation(self.seed)
            img, lab = reorient(img, perm, flips), reorient(lab, perm, flips)
        return img, lab


def generate(seed: int, shape_zyx=(48, 64, 64), *, spacing=None) -> Case:
    """Draw and render one case. ``shape_zyx[0]`` may be None: the slice count then follows
    from a drawn slice spacing. ``spacing`` (x, y, z mm) overrides the drawn spacing; the
    anatomy stays centred on the grid."""
    shape_zyx = tuple(shape_zyx)
    if len(shape_zyx) != 3 or None in shape_zyx[1:] or any(s is not None and int(s) < 2 for s in shape_zyx):
        raise ValueError(f"shape_zyx must be (z or None, y, x) with sizes >= 2, got {shape_zyx}")
    if spacing is not None and (len(spacing) != 3 or not all(np.isfinite(v) and v > 0 for v in spacing)):
        raise ValueError(f"spacing must be three positive mm values (x, y, z), got {spacing}")
    rng = np.random.default_rng(seed)
    patient = draw_patient(rng)
    grid = draw_grid(rng, patient, (None if shape_zyx[0] is None else int(shape_zyx[0]), int(shape_zyx[1]), int(shape_zyx[2])), spacing)
    image, labels = render(patient, grid, seed)
    return Case(seed, image, labels, grid)


def make_case(seed: int, shape_zyx=(48, 64, 64), *, spacing=None, random_orientation: bool = False
              ) -> tuple[sitk.Image, sitk.Image]:
    """One case as (int16 CT, uint8 label map) SimpleITK images on the same grid."""
    return generate(seed, shape_zyx, spacing=spacing).images(random_orientation=random_orientation)


def _to_sitk(array: np.ndarray, grid: Grid) -> sitk.Image:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(grid.spacing_xyz)
    img.SetOrigin(grid.origin_xyz)
    return img


def draw_orientation(seed: int) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """One of the 48 axis-aligned orientations, from its own stream of the seed:
    ITK axis i of the written image runs along canonical axis ``perm[i]``, reversed where
    ``flips[i]``."""
    rng = np.random.default_rng([seed, _ORIENT_STREAM])
    perm = tuple(int(v) for v in rng.permutation(3))
    flips = tuple(bool(v) for v in rng.integers(0, 2, 3))
    return perm, flips  # type: ignore[return-value]


def reorient(img: sitk.Image, perm, flips) -> sitk.Image:
    """The same voxels on a permuted / flipped grid with matching direction and origin, so
    every voxel keeps its physical position. ``img`` must have an identity direction."""
    if not np.allclose(img.GetDirection(), np.eye(3).ravel()):
        raise ValueError("reorient expects an image with identity direction")
    a = sitk.GetArrayFromImage(img)
    size, spacing, origin = img.GetSize(), np.array(img.GetSpacing()), np.array(img.GetOrigin())
    # numpy axis j of the output is ITK axis 2 - j, i.e. canonical ITK axis perm[2 - j]
    out = np.transpose(a, [2 - perm[2 - j] for j in range(3)])
    out = np.flip(out, [j for j in range(3) if flips[2 - j]]) if any(flips) else out
    direction = np.zeros((3, 3))
    start = np.zeros(3)
    for i in range(3):
        direction[perm[i], i] = -1.0 if flips[i] else 1.0
        start[perm[i]] = size[perm[i]] - 1 if flips[i] else 0
    res = sitk.GetImageFromArray(np.ascontiguousarray(out))
    res.SetSpacing(tuple(float(spacing[perm[i]]) for i in range(3)))
    res.SetOrigin(tuple(float(v) for v in origin + spacing * start))
    res.SetDirection(tuple(float(v) for v in direction.ravel()))
    return res


def case_seed(seed: int, index: int) -> int:
    """The seed of case ``index`` (1-based) of a dataset drawn with ``seed``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint32)[0])


def write_dataset(out_dir, n: int, seed: int = 0, shape_zyx=(48, 64, 64), *, prefix: str = "Phantom",
                  unlabeled: bool = False, random_orientation: bool = False, spacing=None) -> list[dict]:
    """Write ``n`` cases in the FLARE layout: ``images/<prefix>_0001_0000.nii.gz`` and, unless
    ``unlabeled``, ``labels/<prefix>_0001.nii.gz`` on the same grid. Returns one record per case."""
    out_dir = Path(out_dir)
    records = []
    for i in range(1, n + 1):
        t0 = time.perf_counter()
        cs = case_seed(seed, i)
        name = f"{prefix}_{i:04d}"
        case = generate(cs, shape_zyx, spacing=spacing)
        img, lab = case.images(random_orientation=random_orientation)
        image_path = atomic_write_image(img, out_dir / "images" / f"{name}_0000.nii.gz")
        label_path = None
        if not unlabeled:
            label_path = atomic_write_image(lab, out_dir / "labels" / f"{name}.nii.gz")
        records.append(dict(
            name=name, seed=cs, image=str(image_path), label=None if label_path is None else str(label_path),
            size=list(img.GetSize()), spacing=[round(v, 4) for v in img.GetSpacing()],
            direction=[int(round(v)) for v in img.GetDirection()],
            voxels={ORGANS[k]: int(np.count_nonzero(case.labels == k)) for k in ORGANS},
            seconds=round(time.perf_counter() - t0, 3)))
    return records


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------
def _size(text: str) -> int:
    v = int(text)
    if v < 0 or v == 1:
        raise argparse.ArgumentTypeError(f"sizes must be >= 2 (0 for a drawn slice count), got {text}")
    return v


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="output folder (images/, labels/)")
    parser.add_argument("-n", "--num", type=positive_int, default=1, help="number of cases (default 1)")
    parser.add_argument("--seed", type=nonneg_int, default=0, help="dataset seed (default 0)")
    grid = parser.add_mutually_exclusive_group()
    grid.add_argument("--size", nargs=3, type=_size, metavar=("X", "Y", "Z"),
                      help="grid size in ITK order; Z = 0 draws the slice count (default 64 64 48)")
    grid.add_argument("--shape", nargs=3, type=_size, metavar=("Z", "Y", "X"), help="grid size in numpy order")
    parser.add_argument("--random-orientation", action="store_true",
                        help="write each case in a random one of the 48 axis-aligned orientations")
    parser.add_argument("--unlabeled", action="store_true", help="images only (no labels/ folder)")
    parser.add_argument("--prefix", default="Phantom", help="case name prefix (default Phantom)")


def run(args: argparse.Namespace) -> int:
    if args.shape is not None:
        shape = tuple(args.shape)
    elif args.size is not None:
        shape = tuple(args.size[::-1])
    else:
        shape = (48, 64, 64)
    shape = (None if shape[0] == 0 else shape[0], shape[1], shape[2])
    if shape[1] == 0 or shape[2] == 0:
        print("flare22 phantom: only the slice count may be 0 (drawn)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    records = write_dataset(args.out, args.num, args.seed, shape, prefix=args.prefix,
                            unlabeled=args.unlabeled, random_orientation=args.random_orientation)
    report = dict(out=str(args.out), seed=args.seed, shape_zyx=list(shape), n=len(records),
                  seconds=round(time.perf_counter() - t0, 3), cases=records)
    print(json.dumps(report, indent=1))
    return 0
