"""The `flare22` command: thin argparse front end over the project's Python API.

Each subcommand lives in its own module, which exposes ``add_arguments(parser)`` and
``run(args) -> int``. Modules are imported only when their subcommand runs, so the
appliance's commands (predict, evaluate, phantom, ...) never import torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Modules that need torch live under training/ or export/.
COMMANDS: dict[str, tuple[str, str]] = {
    "predict": ("app.predict", "segment every *_0000 CT in a folder with a model bundle"),
    "propagate": ("app.assist", "fill a CT's label volume from a few annotated slices"),
    "evaluate": ("app.scoring", "FLARE22 DSC / NSD of predictions against ground truth"),
    "phantom": ("app.phantom", "generate synthetic abdomen CT cases with FLARE22 labels"),
    "efficiency": ("docker.harness", "run a command once per case and measure it as FLARE does"),
    "benchmark": ("app.benchmark", "full pipeline vs dense baseline on 512 x 512 x N phantoms"),
    "train-reference": ("training.train_reference", "train the CPS pair (TransUNet + DeepLabV3+)"),
    "train-propagation": ("training.train_propagation", "train the STCN propagation network"),
    "pseudo-label": ("training.pseudo_label", "pseudo labels with uncertainty estimation"),
    "cycle": ("training.cycle", "train -> pseudo-label -> retrain cycles"),
    "export": ("export.bundle", "checkpoints -> ONNX / torch.export model bundle with parity check"),
}


def build_parser(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, object]:
    parser = argparse.ArgumentParser(prog="flare22", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, helptext) in COMMANDS.items():
        sub.add_parser(name, help=helptext, add_help=False)
    return parser, sub


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, _ = build_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.print_help()
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    name, rest = argv[0], argv[1:]
    module_name, helptext = COMMANDS[name]
    module = importlib.import_module(module_name)
    sub = argparse.ArgumentParser(prog=f"flare22 {name}", description=helptext)
    module.add_arguments(sub)
    args = sub.parse_args(rest)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
