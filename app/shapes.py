"""Shape-based interpolation along z: one definition, used by the pipeline's ``shape`` mode
(between the pair's sampled slices) and by the annotation assist's ``interp`` and ``fused``
modes (between the drawn slices)."""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy import ndimage


def signed_distance(mask: np.ndarray) -> np.ndarray:
    """In-plane signed distance (pixels) of a 2-D mask: >= 1 inside, <= -1 outside."""
    mask = np.asarray(mask, bool)
    return (ndimage.distance_transform_edt(mask) - ndimage.distance_transform_edt(~mask)).astype(np.float32)


class ShapeInterpolator:
    """Shape-based interpolation between known slices, organ by organ.

    ``known`` gives the label slice of every index in ``slices``: a (N, H, W) volume, or a
    mapping {index: (H, W) labels}. Between known slices a < t < b an organ's level function
    is the signed distances of its masks on a and b blended linearly by distance,
    (b - t) / (b - a) * d_a + (t - a) / (b - a) * d_b; the organ is where that is positive.
    Where the organ is on only one side, the other side's distance is ``-vanish * depth``
    (depth: the largest inside distance of the known mask), so the shape shrinks towards its
    centre and is gone at 1 / (1 + vanish) of the way: an organ that ends between two known
    slices tapers rather than stopping at the midpoint. With ``align`` both distances are
    first shifted so the organ's centroid moves linearly from a to b (organs that drift across
    the plane, like the stomach or the duodenum, are not cut down to the overlap of the two
    shapes). Outside the known range the nearest known slice is copied. Overlaps go to the
    organ with the largest level.

    Distances are computed once per known slice and kept only while queries move forwards
    (those below the current interval are dropped), so a pass over a long volume holds two
    slices' worth."""

    def __init__(self, known: np.ndarray | Mapping[int, np.ndarray], slices: list[int], *,
                 vanish: float = 1.0, align: bool = True):
        self.ann = known
        self.slices = sorted(int(s) for s in slices)
        if not self.slices:
            raise ValueError("shape interpolation needs at least one known slice")
        self.hw = tuple(np.shape(known[self.slices[0]]))
        self.vanish = float(vanish)
        self.align = align
        self._sdf: dict[int, dict[int, np.ndarray]] = {}
        self._centre: dict[int, dict[int, np.ndarray]] = {}

    def _distances(self, t: int) -> dict[int, np.ndarray]:
        if t not in self._sdf:
            lab = np.asarray(self.ann[t])
            organs = [int(o) for o in np.unique(lab) if o != 0]
            self._sdf[t] = {o: signed_distance(lab == o) for o in organs}
            self._centre[t] = {o: np.argwhere(lab == o).mean(axis=0) for o in organs}
        return self._sdf[t]

    def _forget_before(self, a: int) -> None:
        for t in [t for t in self._sdf if t < a]:
            del self._sdf[t], self._centre[t]

    def levels(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """(organ ids, (k, H, W) level functions) of slice t: positive inside each organ."""
        s = self.slices
        i = int(np.searchsorted(s, t))
        if i < len(s) and s[i] == t or i == 0 or i == len(s):
            near = s[min(i, len(s) - 1)] if (i < len(s) and s[i] == t) or i == 0 else s[-1]
            d = self._distances(near)
            ids = sorted(d)
            return np.asarray(ids, int), (np.stack([d[o] for o in ids]) if ids else
                                          np.zeros((0,) + self.hw, np.float32))
        a, b = s[i - 1], s[i]
        self._forget_before(a)
        wa = (b - t) / (b - a)
        da, db = self._distances(a), self._distances(b)
        ids = sorted(set(da) | set(db))
        out = np.empty((len(ids),) + self.hw, np.float32)
        for k, o in enumerate(ids):
            fa = da.get(o)
            fb = db.get(o)
            if fa is None:
                fa = np.float32(-self.vanish * max(1.0, float(fb.max())))
            elif fb is None:
                fb = np.float32(-self.vanish * max(1.0, float(fa.max())))
            elif self.align:  # both shapes moved to the interpolated centre before blending
                ca, cb = self._centre[a][o], self._centre[b][o]
                c = wa * ca + (1 - wa) * cb
                fa = ndimage.shift(fa, c - ca, order=1, mode="nearest")
                fb = ndimage.shift(fb, c - cb, order=1, mode="nearest")
            out[k] = wa * fa + (1 - wa) * fb
        return np.asarray(ids, int), out

    def labels(self, t: int) -> np.ndarray:
        """(H, W) uint8 labels of slice t."""
        ids, lev = self.levels(t)
        if not len(ids):
            return np.zeros(self.hw, np.uint8)
        win = lev.argmax(axis=0)
        return np.where(lev.max(axis=0) > 0, ids[win], 0).astype(np.uint8)

    def scores(self, t: int, num_organs: int) -> np.ndarray:
        """(num_organs + 1, H, W) scores of slice t for an argmax (resized first where the
        output grid differs): background 0, each organ its level, absent organs far below."""
        ids, lev = self.levels(t)
        out = np.full((num_organs + 1,) + self.hw, -1e4, np.float32)
        out[0] = 0.0
        out[ids] = lev
        return out
