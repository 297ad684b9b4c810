"""FLARE22 label ids, organ names and the organisers' NSD tolerances (REFERENCE section 1-2)."""
from __future__ import annotations

NUM_CLASSES = 14  # background + 13 organs

ORGANS: dict[int, str] = {
    1: "liver",
    2: "right_kidney",
    3: "spleen",
    4: "pancreas",
    5: "aorta",
    6: "inferior_vena_cava",
    7: "right_adrenal_gland",
    8: "left_adrenal_gland",
    9: "gallbladder",
    10: "esophagus",
    11: "stomach",
    12: "duodenum",
    13: "left_kidney",
}

# Normalised-surface-Dice tolerance in mm, per organ (organisers' evaluation script).
NSD_TOLERANCE_MM: dict[int, float] = {
    1: 5.0, 2: 3.0, 3: 3.0, 4: 5.0, 5: 2.0, 6: 2.0, 7: 2.0,
    8: 2.0, 9: 2.0, 10: 3.0, 11: 5.0, 12: 7.0, 13: 3.0,
}

# Tubular organs whose masks are cropped to the ground truth's axial range before scoring.
AXIAL_CROP_ORGANS = (5, 6, 10)

CLASS_NAMES: list[str] = ["background"] + [ORGANS[i] for i in range(1, NUM_CLASSES)]
