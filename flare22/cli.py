"""The ``flare22`` command: every workflow of the project behind one argparse front end.

It sits above all packages: the appliance's two commands (``predict``, ``propagate``) plus
training, export, evaluation and benchmarks. Modules are imported only when their command
runs, so ``flare22 predict`` never imports torch unless ``--backend torch`` asks for it.
"""
from __future__ import annotations

import importlib
import sys

from app.cli import COMMANDS as APPLIANCE_COMMANDS
from app.cli import dispatch


def _module(name: str):
    return lambda: importlib.import_module(name)


def _torch_backends(bundle, **kwargs):
    from training.torch_backend import load_torch_backends  # torch: development install only

    return load_torch_backends(bundle, **kwargs)


def _random_bundle(out, config: str):
    from export.bundle import export_bundle  # torch: development install only

    return export_bundle(out, ref_config=config, stcn_config=config, programs=False, quiet=True)


def _benchmark():
    """evaluation.benchmark, with the random-bundle export it may not import itself."""
    module = importlib.import_module("evaluation.benchmark")
    module.RANDOM_BUNDLE = _random_bundle
    return module


def _fuzz():
    """evaluation.fuzz, with the random-bundle export it may not import itself."""
    module = importlib.import_module("evaluation.fuzz")
    module.RANDOM_BUNDLE = _random_bundle
    return module


COMMANDS = {
    **APPLIANCE_COMMANDS,
    "evaluate": (_module("evaluation.scoring"), "FLARE22 DSC / NSD of predictions against ground truth"),
    "phantom": (_module("evaluation.phantom"), "generate synthetic abdomen CT cases with FLARE22 labels"),
    "efficiency": (_module("evaluation.harness"), "run a command once per case and measure it as FLARE does"),
    "benchmark": (_benchmark, "full pipeline vs dense baseline on 512 x 512 x N phantoms"),
    "fuzz": (_fuzz, "seeded, bounded fuzzing of inputs and bundles: no traceback, hang or stray write"),
    "train-reference": (_module("training.train_reference"), "train the CPS pair (TransUNet + DeepLabV3+)"),
    "train-propagation": (_module("training.train_propagation"), "train the STCN propagation network"),
    "pseudo-label": (_module("training.pseudo_label"), "pseudo labels with uncertainty estimation"),
    "cycle": (_module("training.cycle"), "train -> pseudo-label -> retrain cycles"),
    "export": (_module("export.bundle"), "checkpoints -> ONNX / torch.export model bundle with parity check"),
    "quantize": (_module("export.quantize"), "a bundle -> a new sealed bundle with int8 graphs (calibrated on CTs)"),
}


def main(argv: list[str] | None = None) -> int:
    from app.backends import register_backend

    register_backend("torch", _torch_backends)  # imports torch only when a run asks for it
    return dispatch("flare22", __doc__.splitlines()[0], COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
