"""Torch networks: the reference pair (TransUNet, DeepLabV3+) and STCN for propagation."""
from training.models.reference import (
    REFERENCE_CONFIGS,
    DeepLabConfig,
    DeepLabV3PlusPos,
    ReferenceConfig,
    ReferencePair,
    TransUNet,
    TransUNetConfig,
    build_reference_pair,
    count_parameters,
)
from training.models.stcn import STCN, STCN_CONFIGS, STCNConfig, build_stcn

__all__ = [
    "REFERENCE_CONFIGS",
    "DeepLabConfig",
    "DeepLabV3PlusPos",
    "ReferenceConfig",
    "ReferencePair",
    "TransUNet",
    "TransUNetConfig",
    "build_reference_pair",
    "count_parameters",
    "STCN",
    "STCN_CONFIGS",
    "STCNConfig",
    "build_stcn",
]
